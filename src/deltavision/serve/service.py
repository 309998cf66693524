"""The feature service: a frozen backbone behind HTTP, sending Gather_k per image (MIST, Sec. 2.2).

Endpoints (JSON errors ``{"error": {"code", "message"}}``, always 4xx for bad input):

- ``GET /health``: liveness, no token.
- ``GET /v1/info``: backbone, fingerprint, feature shape, k values, dtypes, image size,
  normalisation, limits.
- ``POST /v1/features?k=K&dtype=D``: images as multipart/form-data file fields named
  ``images``; K is one of the candidate k values, a comma-separated list of them, or
  ``all`` (default: N); D is float32, float16 or int8. The response is a safetensors
  payload (see :mod:`.wire`).
- ``GET /v1/stats``: request, cache and batching counters.

Every ``/v1`` call needs ``Authorization: Bearer <token>``. Features of every
candidate k are computed in one pass per image and kept in a content-addressed
LRU (:mod:`.cache`); concurrent requests are micro-batched (:mod:`.batcher`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, ImageOps
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from ..data.images import to_rgb
from ..data.transforms import make_transforms
from ..errors import DeltaVisionError
from .batcher import MicroBatcher, QueueFull
from .cache import FeatureLRU
from .gather import Gatherer
from .wire import DTYPES, FORMAT, pack

MIB = 2**20
GATHER_VERSION = "gather-sum-v1"
IMAGE_FIELD = "images"


@dataclass
class ServiceConfig:
    """Token, batching, cache and input limits of one service."""

    token: str
    max_batch: int = 32
    max_wait_ms: float = 5.0
    cache_bytes: int = 512 * MIB
    max_body_bytes: int = 32 * MIB
    max_images: int = 64
    max_pixels: int = 4096 * 4096
    max_pending: int = 1024
    decode_slots: int = 4

    def limits(self) -> dict[str, int]:
        return {
            "max_body_bytes": self.max_body_bytes,
            "max_images": self.max_images,
            "max_pixels": self.max_pixels,
            "max_batch": self.max_batch,
        }


class ApiError(Exception):
    """A request the service refuses: HTTP ``status``, a stable ``code`` and a message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


@dataclass
class Counters:
    requests: int = 0
    images_received: int = 0
    rejected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: int) -> None:
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {"requests": self.requests, "images_received": self.images_received, "rejected": self.rejected}


class FeatureService:
    """Decodes images, computes every candidate Gather_k once per image, caches and encodes them."""

    def __init__(
        self,
        model: nn.Module,
        *,
        backbone: str,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        config: ServiceConfig,
        backbone_options: dict[str, Any] | None = None,
    ):
        if not config.token:
            raise DeltaVisionError("the feature service needs a token: pass --token or set DELTAVISION_TOKEN")
        self.backbone, self.config = backbone, config
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.gatherer = Gatherer(model)
        self.ks = self.gatherer.ks
        self.shape = _probe_shape(self.gatherer, image_size)
        self.transform = make_transforms(image_size, self.mean, self.std, augment=False)[1]
        self.fingerprint = _fingerprint(model, backbone, backbone_options or {}, image_size, self.mean, self.std)
        self.cache = FeatureLRU(config.cache_bytes)
        self.counters = Counters()
        self._decoding = threading.BoundedSemaphore(config.decode_slots)  # bounds decoded-image memory
        self.batcher = MicroBatcher(
            self._run_batch, config.max_batch, config.max_wait_ms / 1000.0, config.max_pending, self.cache.peek
        )

    def info(self) -> dict[str, Any]:
        values = self.shape.tokens * self.shape.width
        return {
            "format": FORMAT,
            "backbone": self.backbone,
            "family": self.gatherer.family,
            "fingerprint": self.fingerprint,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": "bilinear",
            "feature_shape": [self.shape.tokens, self.shape.width],
            "grid": list(self.shape.grid),
            "num_prefix_tokens": self.shape.num_prefix_tokens,
            "num_blocks": self.gatherer.num_blocks,
            "summed_blocks": list(self.gatherer.summed_blocks),
            "k_values": list(self.ks),
            "default_k": self.ks[-1],
            "dtypes": list(DTYPES),
            "tensor_bytes_per_image": {
                name: values * torch.empty(0, dtype=dtype).element_size() + (4 if name == "int8" else 0)
                for name, dtype in DTYPES.items()
            },
            "limits": self.config.limits(),
        }

    def stats(self) -> dict[str, Any]:
        return {**self.counters.as_dict(), "cache": self.cache.stats(), "batching": self.batcher.stats()}

    def parse_ks(self, text: str | None) -> list[int]:
        """The k values a request asks for: None -> [N]; "all"; "K" or "K1,K2"."""
        if text is None or not text.strip():
            return [self.ks[-1]]
        if text.strip().lower() == "all":
            return list(self.ks)
        try:
            ks = sorted({int(part) for part in text.split(",")})
        except ValueError:
            ks = []
        if not ks or any(k not in self.ks for k in ks):
            raise ApiError(400, "unknown_k", f"k must be one of {list(self.ks)}, a comma-separated list or 'all'; got {text!r}")
        return ks

    def decode(self, data: bytes) -> torch.Tensor:
        """Normalised (3, S, S) pixels of an encoded image; ApiError for undecodable or oversized ones."""
        with self._decoding:
            return self._decode(data)

    def _decode(self, data: bytes) -> torch.Tensor:
        try:
            with Image.open(BytesIO(data)) as image:
                width, height = image.size
                if width * height > self.config.max_pixels:
                    raise ApiError(413, "image_too_large", f"a {width}x{height} image exceeds the {self.config.max_pixels}-pixel limit")
                upright = ImageOps.exif_transpose(image)
                upright.load()
                rgb = to_rgb(upright)
        except ApiError:
            raise
        except Image.DecompressionBombError as err:
            raise ApiError(413, "image_too_large", str(err)) from err
        except Exception as err:  # any decoder failure on untrusted bytes is the sender's problem
            raise ApiError(422, "undecodable_image", f"could not decode an image ({type(err).__name__})") from err
        return self.transform(rgb)

    async def gather(self, images: list[bytes]) -> tuple[list[str], list[dict[int, torch.Tensor]], int]:
        """(hashes, {k: features} per image, cache hits) for encoded ``images``."""
        hashes = [hashlib.sha256(data).hexdigest() for data in images]
        by_hash = dict(zip(hashes, images))  # equal hashes, equal bytes
        found = {h: self.cache.get(h) for h in dict.fromkeys(hashes)}
        hits = sum(entry is not None for entry in found.values())
        missing = [(h, by_hash[h]) for h, entry in found.items() if entry is None]
        pixels = await asyncio.gather(*(run_in_threadpool(self.decode, data) for _, data in missing))
        try:
            futures = [self.batcher.submit(h, p) for (h, _), p in zip(missing, pixels)]
        except QueueFull as err:
            raise ApiError(429, "busy", f"the service is busy ({err}); retry shortly", {"Retry-After": "1"}) from err
        for (h, _), future in zip(missing, futures):
            found[h] = await asyncio.shield(asyncio.wrap_future(future))
        return hashes, [found[h] for h in hashes], hits

    def encode(self, hashes: list[str], entries: list[dict[int, torch.Tensor]], ks: list[int], dtype: str) -> bytes:
        gathered = {k: torch.stack([entry[k] for entry in entries]) for k in ks}
        metadata = {"backbone": self.backbone, "fingerprint": self.fingerprint}
        return pack(gathered, dtype, hashes, metadata)

    def close(self) -> None:
        self.batcher.close()

    def _run_batch(self, keys: list[str], pixels: torch.Tensor) -> list[dict[int, torch.Tensor]]:
        gathered = self.gatherer(pixels, self.ks)
        entries = [{k: gathered[k][i].clone() for k in self.ks} for i in range(len(keys))]
        for key, entry in zip(keys, entries):
            self.cache.put(key, entry)
        return entries


def _probe_shape(gatherer: Gatherer, image_size: int):
    try:
        return gatherer.output_shape(image_size)
    except (AssertionError, RuntimeError, ValueError) as err:
        raise DeltaVisionError(f"image size {image_size} does not fit this backbone ({str(err)[:200]})") from err


def _native_size(model: nn.Module, resolved: dict) -> int:
    """The input size a fixed-size model was built for (ViT/Swin img_size option), else timm's default."""
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed and not getattr(model.patch_embed, "dynamic_img_size", False):
        return int(fixed[-1])
    return int(resolved["input_size"][-1])


def _fingerprint(model: nn.Module, backbone: str, options: dict, image_size: int, mean, std) -> str:
    """Identity of the feature space: same fingerprint, same features for the same image bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = {
        "backbone": backbone,
        "options": {k: str(v) for k, v in sorted(options.items())},
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "gather": GATHER_VERSION,
        "weights": digest.hexdigest(),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def build_service(
    backbone: str,
    config: ServiceConfig,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    image_size: int | None = None,
    backbone_options: dict[str, Any] | None = None,
) -> FeatureService:
    """A service around a timm backbone built by :func:`deltavision.backbones.create_backbone`."""
    from timm.data import resolve_data_config

    from ..backbones import create_backbone

    model = create_backbone(backbone, 0, pretrained=pretrained, checkpoint=checkpoint, options=backbone_options)
    resolved = resolve_data_config(model=model)
    return FeatureService(
        model,
        backbone=backbone,
        image_size=image_size or _native_size(model, resolved),
        mean=tuple(resolved["mean"]),
        std=tuple(resolved["std"]),
        config=config,
        backbone_options=backbone_options,
    )


# --- HTTP ---------------------------------------------------------------------------------------


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
        if dtype not in DTYPES:
            raise ApiError(400, "unknown_dtype", f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        body = await _read_body(request, service.config.max_body_bytes)
        images = await _read_images(request, body, service.config.max_images)
        service.counters.add(requests=1, images_received=len(images))
        hashes, entries, hits = await service.gather(images)
        payload = await run_in_threadpool(service.encode, hashes, entries, ks, dtype)
        headers = {"X-DeltaVision-Cache-Hits": str(hits), "X-DeltaVision-Images": str(len(images))}
        return Response(payload, media_type="application/octet-stream", headers=headers)

    return app
