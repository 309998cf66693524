"""The feature service's HTTP face: FastAPI routes, authentication, body and multipart reading.

Endpoints (JSON errors ``{"error": {"code", "message"}}``, always 4xx for bad input):

- ``GET /health``: liveness, no token.
- ``GET /v1/info``: backbone, fingerprint, feature shape, ks, dtypes, image size,
  normalisation, limits.
- ``POST /v1/features?k=K&dtype=D``: images as multipart/form-data file fields named
  ``images``; K is one of the candidate k values, a comma-separated list of them, or
  ``all`` (default: N); D is float32, float16 or int8. The response is a safetensors
  payload (see :mod:`..wire`).
- ``GET /v1/stats``: request, cache and batching counters.

Every ``/v1`` call needs ``Authorization: Bearer <token>``. What is computed and
how is :mod:`.service`'s business; this module only speaks HTTP.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..wire import UnknownDtypeError, transfer_dtype
from .service import IMAGE_FIELD, ApiError, FeatureService

def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _check_token(service: FeatureService, request: Request) -> None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), service.config.token.encode()):
        raise ApiError(401, "unauthorized", "send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_content_length", "Content-Length must be a number")
        if int(declared) > limit:
            raise ApiError(413, "payload_too_large", f"the body is {declared} bytes; the limit is {limit}")
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


async def _read_images(request: Request, body: bytes, max_images: int) -> list[bytes]:
    """The file fields named ``images`` of a multipart body, in order."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", f"send images as multipart/form-data file fields named {IMAGE_FIELD!r}")
    replayed = Request(request.scope, receive=_replay(body))
    try:
        form = await replayed.form(max_files=max_images + 1, max_fields=16)
    except Exception as err:  # malformed multipart of any kind
        detail = getattr(err, "detail", None) or type(err).__name__
        raise ApiError(400, "bad_multipart", f"could not parse the multipart body ({detail})") from err
    try:
        files = [item for item in form.getlist(IMAGE_FIELD) if hasattr(item, "read")]
        if not files:
            raise ApiError(400, "no_images", f"no file fields named {IMAGE_FIELD!r} in the request")
        if len(files) > max_images:
            raise ApiError(413, "too_many_images", f"at most {max_images} images per request")
        return [await item.read() for item in files]
    finally:
        await form.close()


def create_app(service: FeatureService) -> FastAPI:
    """The FastAPI application serving ``service`` (whoever made the service closes it)."""
    app = FastAPI(title="deltavision feature service (MIST)", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

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
        body = await _read_body(request, service.config.max_body_bytes)
        images = await _read_images(request, body, service.config.max_images)
        service.counters.add(requests=1, images_received=len(images))
        digests, entries, hits = await service.features(images)
        payload = await run_in_threadpool(service.encode, digests, entries, ks, dtype)
        headers = {"X-DeltaVision-Cache-Hits": str(hits), "X-DeltaVision-Images": str(len(images))}
        return Response(payload, media_type="application/octet-stream", headers=headers)

    return app
