"""The feature service's HTTP face: FastAPI routes, authentication, body and multipart reading.

Endpoints (JSON errors ``{"error": {"code", "message"}}``, always 4xx for bad input):

- ``GET /health``: liveness, no token.
- ``GET /healthz``: readiness for a load balancer or Ray Serve, no token: 200 with
  ``{"status": "ok"|"degraded", ...}`` while the service can answer (``degraded``: its
  shared cache is unreachable, so it computes everything), 503 JSON error if it cannot.
- ``GET /metrics``: Prometheus text format (:mod:`.metrics`), no token; counts only.
- ``GET /v1/info``: backbone, fingerprint, feature shape, ks, dtypes, image size,
  normalisation, limits.
- ``POST /v1/features?k=K&dtype=D``: images as multipart/form-data file fields named
  ``images``; K is one of the candidate k values, a comma-separated list of them, or
  ``all`` (default: N); D is float32, float16 or int8. The response is a safetensors
  payload (see :mod:`..wire`).
- ``GET /v1/stats``: request, cache and batching counters.

Every ``/v1`` call needs ``Authorization: Bearer <token>``. What is computed and
how is :mod:`.service`'s business; this module only speaks HTTP.

Slow clients: the request line and headers must arrive within
``header_timeout`` seconds of the connection opening (or of the previous
response), else the connection is closed; the body must arrive within the
service's ``body_timeout``, else 408. Headers are bounded by h11's
``max_incomplete_event_size`` (``MAX_HEADER_BYTES``), bodies by
``max_body_bytes``; a stalled client holds one connection, never the worker.

HTTP-level errors (a garbage request line, a malformed Content-Length, oversized
headers) are detected by h11 before any ASGI code runs; uvicorn answers them
with a plain-text 400 from ``H11Protocol.send_400_response`` and offers no hook.
:class:`ServiceProtocol` overrides that method so they get the same JSON error
body as everything else (code ``bad_http_request``). With uvicorn's httptools
protocol this would not apply; :func:`serve` always selects this h11 one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

import h11
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..wire import UnknownDtypeError, transfer_dtype
from .metrics import CONTENT_TYPE, ServiceMetrics, endpoint_label
from .service import IMAGE_FIELD, ApiError, FeatureService, Upload

MAX_HEADER_BYTES = 16 * 1024
HEADER_TIMEOUT = 10.0
KEEP_ALIVE_TIMEOUT = 5.0


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _check_token(service: FeatureService, request: Request) -> None:
    """401 unless the request carries exactly the service's bearer token (compared in constant time)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), service.config.token.encode()):
        raise ApiError(401, "unauthorized", "send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them all, and a body
    that takes longer than ``timeout`` seconds to arrive (408)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_content_length", "Content-Length must be a number")
        if int(declared) > limit:
            raise ApiError(413, "payload_too_large", f"the body is {declared} bytes; the limit is {limit}")
    try:
        return await asyncio.wait_for(_collect_body(request, limit), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, "body_timeout", f"the body did not arrive within {timeout:g} s", {"Connection": "close"}) from None


async def _collect_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"the body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _replay(body: bytes):
    """An ASGI ``receive`` that hands out an already-read body once."""
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _read_uploads(request: Request, body: bytes, max_images: int) -> list[Upload]:
    """The file fields named ``images`` of a multipart body, in order."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", f"send images as multipart/form-data file fields named {IMAGE_FIELD!r}")
    replayed = Request(request.scope, receive=_replay(body))
    try:
        form = await replayed.form(max_files=max_images, max_fields=16)
    except Exception as err:  # malformed multipart of any kind
        detail = str(getattr(err, "detail", None) or type(err).__name__)
        if detail.startswith("Too many files"):  # starlette's words when max_files is passed
            raise ApiError(413, "too_many_images", f"at most {max_images} images per request") from err
        raise ApiError(400, "bad_multipart", f"could not parse the multipart body ({detail})") from err
    try:
        files = [item for item in form.getlist(IMAGE_FIELD) if hasattr(item, "read")]
        if not files:
            raise ApiError(400, "no_images", f"no file fields named {IMAGE_FIELD!r} in the request")
        return [Upload(index, item.filename or "", await item.read()) for index, item in enumerate(files)]
    finally:
        await form.close()


class RequestMetrics:
    """ASGI middleware timing every HTTP request and counting it by endpoint and status."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self.metrics.observe_request(endpoint_label(scope["path"]), status, time.perf_counter() - started)


def create_app(service: FeatureService) -> FastAPI:
    """The FastAPI application serving ``service`` (whoever made the service closes it)."""
    app = FastAPI(title="deltavision feature service (MIST)", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(RequestMetrics, metrics=service.metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        service.counters.add(rejected=1)
        return _error_response(err.status, err.code, err.message, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return _error_response(err.status_code, f"http_{err.status_code}", str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return _error_response(400, "bad_request", str(err.errors())[:500])

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception):
        return _error_response(500, "internal_error", f"{type(err).__name__} while serving the request")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/healthz")
    async def healthz():
        able, details = await run_in_threadpool(service.health)
        if not able:
            return _error_response(503, "unavailable", "the batching worker has stopped; restart the service")
        return details

    @app.get("/metrics")
    async def metrics():
        exposition = await run_in_threadpool(service.metrics.exposition)
        return Response(exposition, media_type=CONTENT_TYPE)

    @app.get("/v1/info")
    async def info(request: Request):
        _check_token(service, request)
        return service.info()

    @app.get("/v1/stats")
    async def stats(request: Request):
        _check_token(service, request)
        return service.stats()

    @app.post("/v1/features")
    async def features(request: Request, k: str | None = None, dtype: str = "float32"):
        _check_token(service, request)
        ks = service.parse_ks(k)
        try:
            transfer_dtype(dtype)
        except UnknownDtypeError as err:
            raise ApiError(400, "unknown_dtype", str(err)) from err
        body = await _read_body(request, service.config.max_body_bytes, service.config.body_timeout)
        uploads = await _read_uploads(request, body, service.config.max_images)
        del body
        service.counters.add(requests=1, images_received=len(uploads))
        digests, entries, hits = await service.features(uploads)
        payload = await run_in_threadpool(service.encode, digests, entries, ks, dtype)
        headers = {"X-DeltaVision-Cache-Hits": str(hits), "X-DeltaVision-Images": str(len(uploads))}
        return Response(payload, media_type="application/octet-stream", headers=headers)

    return app


# --- the HTTP server ----------------------------------------------------------------------------


class ServiceProtocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and JSON answers to malformed HTTP."""

    header_timeout: float = HEADER_TIMEOUT
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's headers get the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """What uvicorn sends when h11 cannot parse the request, as the service's JSON error."""
        body = json.dumps({"error": {"code": "bad_http_request", "message": msg}}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body)):
            self.transport.write(self.conn.send(event))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_with(header_timeout: float) -> type[ServiceProtocol]:
    """:class:`ServiceProtocol` with its own header deadline (uvicorn takes a class, not an instance)."""
    return type("ServiceProtocol", (ServiceProtocol,), {"header_timeout": float(header_timeout)})


def server_config(
    service: FeatureService,
    host: str,
    port: int,
    *,
    header_timeout: float = HEADER_TIMEOUT,
    keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT,
    ssl_keyfile: str | None = None,
    ssl_certfile: str | None = None,
    log_level: str = "warning",
):
    """The uvicorn configuration every service runs with: our protocol, bounded headers and timeouts."""
    import uvicorn

    return uvicorn.Config(
        create_app(service), host=host, port=port, log_level=log_level, http=protocol_with(header_timeout),
        timeout_keep_alive=keep_alive_timeout, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile, lifespan="off",
    )  # fmt: skip


def serve(service: FeatureService, host: str, port: int, **options) -> None:
    """Serve ``service`` over HTTP until interrupted (options: see :func:`server_config`)."""
    import uvicorn

    uvicorn.Server(server_config(service, host, port, **options)).run()
