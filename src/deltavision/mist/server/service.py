"""The feature service: a frozen backbone answering Gather_k per image (MIST, Sec. 2.2).

:class:`FeatureService` decodes images, computes every candidate k in one pass
per image, keeps the result in a content-addressed LRU (:mod:`.cache`) and
micro-batches concurrent requests (:mod:`.batcher`); :mod:`.app` puts it behind
HTTP. :class:`ApiError` is how it refuses input (an HTTP status and a stable code).

Decoding is bounded before it starts: every image's size is read from its
header, and a request whose uncached images together exceed
``max_request_pixels`` (or holding one image over ``max_pixels``) is refused
with 413 before any pixel is decoded. JPEGs are decoded at a reduced scale
(PIL's draft mode, never below twice the input size) before the resize.

Stable answers: the cache keeps the first features computed for an image
digest and never replaces them, so while an image stays cached every request
for it gets the same tensors, and identical requests get identical bytes
(:func:`..wire.serialise`). Float32 features of one image otherwise depend on
the batch it was computed in (up to ~1.3e-4 for ViT-B/16, because matrix
kernels block their sums by batch size): an image evicted from the cache
(``cache_bytes``) and sent again may come back slightly different.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from starlette.concurrency import run_in_threadpool
from torch import nn

from ...data.images import to_rgb
from ...data.transforms import make_transforms
from ...errors import DeltaVisionError
from ..wire import DTYPES, FORMAT, digest, pack
from .batcher import MicroBatcher, QueueFull
from .cache import Entry, make_cache
from .gather import Gather
from .metrics import ServiceMetrics

MIB = 2**20
GATHER_VERSION = "gather-sum-v1"
DECODE_VERSION = "draft-2x-v1"  # part of the fingerprint: how bytes become pixels
IMAGE_FIELD = "images"
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Upload:
    """One image of a request: its position, the filename the client gave, and its bytes."""

    index: int
    filename: str
    data: bytes

    @property
    def label(self) -> str:
        return f"image {self.index} ({self.filename!r})"


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
    max_request_pixels: int = 64 * 2**20
    max_pending: int = 1024
    decode_slots: int = 4
    body_timeout: float = 30.0
    cache_url: str | None = None  # None: in-process LRU; redis://HOST:PORT/DB: shared (see .redis_cache)

    def limits(self) -> dict[str, int]:
        return {
            "max_body_bytes": self.max_body_bytes,
            "max_images": self.max_images,
            "max_pixels": self.max_pixels,
            "max_request_pixels": self.max_request_pixels,
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
        device: str | None = None,
        precision: str = "fp32",
        replica: str = "",
    ):
        check_token(config.token)
        self.backbone, self.config = backbone, config
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.fingerprint = _fingerprint(model, backbone, backbone_options or {}, image_size, self.mean, self.std,
                                        precision)
        self.gather = Gather(model, device=device, precision=precision)
        self.ks = self.gather.ks
        self.shape = _probe_shape(self.gather, image_size)
        self.transform = make_transforms(image_size, self.mean, self.std, augment=False)[1]
        self._draft_size = (2 * image_size, 2 * image_size)
        self.counters = Counters()
        self._decoding = threading.BoundedSemaphore(config.decode_slots)  # bounds decoded-image memory
        self.metrics = ServiceMetrics(self.stats, replica=replica)
        cache = make_cache(config.cache_url, config.cache_bytes, self.fingerprint, self.ks)
        self.batcher = MicroBatcher(
            self._run_batch, cache, config.max_batch, config.max_wait_ms / 1000.0, config.max_pending,
            on_batch=self.metrics.observe_batch,
        )  # fmt: skip

    def info(self) -> dict[str, Any]:
        values = self.shape.tokens * self.shape.width
        return {
            "format": FORMAT,
            "backbone": self.backbone,
            "family": self.gather.family,
            "fingerprint": self.fingerprint,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": "bilinear",
            "feature_shape": [self.shape.tokens, self.shape.width],
            "grid": list(self.shape.grid),
            "num_prefix_tokens": self.shape.num_prefix_tokens,
            "num_blocks": self.gather.num_blocks,
            "summed_blocks": list(self.gather.summed_blocks),
            "ks": list(self.ks),
            "default_k": self.ks[-1],
            "dtypes": list(DTYPES),
            "tensor_bytes_per_image": {
                name: values * torch.empty(0, dtype=dtype).element_size() + (4 if name == "int8" else 0)
                for name, dtype in DTYPES.items()
            },
            "limits": self.config.limits(),
        }

    def stats(self) -> dict[str, Any]:
        return {**self.counters.as_dict(), "cache": self.batcher.cache.stats(), "batching": self.batcher.stats()}

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(able to answer, details): False only if the batching worker died; a cache that fails
        only degrades the service (it computes instead), reported as ``"degraded"``."""
        batching = self.batcher.alive()
        cache = self.batcher.cache.healthy()
        status = "ok" if batching and cache else ("degraded" if batching else "failing")
        return batching, {"status": status, "batching": batching,
                          "cache": {"kind": self.batcher.cache.kind, "reachable": cache}}  # fmt: skip

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

    def image_size_of(self, upload: Upload) -> tuple[int, int]:
        """(width, height) from the image header, nothing decoded; ApiError if unreadable or over ``max_pixels``."""
        try:
            with Image.open(BytesIO(upload.data)) as image:
                width, height = image.size
        except Image.DecompressionBombError as err:
            raise ApiError(413, "image_too_large", f"{upload.label}: {err}") from err
        except Exception as err:  # any decoder failure on untrusted bytes is the sender's problem
            raise ApiError(422, "undecodable_image", f"could not decode {upload.label} ({type(err).__name__})") from err
        if width * height > self.config.max_pixels:
            raise ApiError(
                413, "image_too_large", f"{upload.label} is {width}x{height}, over the {self.config.max_pixels}-pixel limit"
            )
        return width, height

    def check_pixel_budget(self, uploads: list[Upload]) -> None:
        """Refuse (413) a request whose images together hold more than ``max_request_pixels``."""
        total = sum(width * height for width, height in map(self.image_size_of, uploads))
        if total > self.config.max_request_pixels:
            raise ApiError(
                413, "request_too_large",
                f"the images to decode hold {total} pixels; the limit per request is {self.config.max_request_pixels}",
            )  # fmt: skip

    def decode(self, data: bytes, label: str = "an image") -> torch.Tensor:
        """Normalised (3, S, S) pixels of an encoded image; ApiError for undecodable or oversized ones."""
        with self._decoding:
            return self._decode(data, label)

    def _decode(self, data: bytes, label: str) -> torch.Tensor:
        try:
            with Image.open(BytesIO(data)) as image:
                width, height = image.size
                if width * height > self.config.max_pixels:
                    raise ApiError(413, "image_too_large", f"{label} is {width}x{height}, over the {self.config.max_pixels}-pixel limit")
                image.draft("RGB", self._draft_size)  # JPEG only: decode at 1/2, 1/4 or 1/8 scale
                upright = ImageOps.exif_transpose(image)
                upright.load()
                rgb = to_rgb(upright)
                del upright
        except ApiError:
            raise
        except Image.DecompressionBombError as err:
            raise ApiError(413, "image_too_large", f"{label}: {err}") from err
        except Exception as err:  # any decoder failure on untrusted bytes is the sender's problem
            raise ApiError(422, "undecodable_image", f"could not decode {label} ({type(err).__name__})") from err
        return self.transform(rgb)

    async def features(self, uploads: list[Upload]) -> tuple[list[str], list[Entry], int]:
        """(digests, {k: features} per image, cache hits) for the images of one request."""
        digests = [digest(upload.data) for upload in uploads]
        first = dict(zip(reversed(digests), reversed(uploads)))  # equal digests, equal bytes
        found = await run_in_threadpool(self._lookup, digests)
        hits = sum(entry is not None for entry in found.values())
        missing = [(d, first[d]) for d, entry in found.items() if entry is None]
        await run_in_threadpool(self.check_pixel_budget, [upload for _, upload in missing])
        pixels = await asyncio.gather(*(run_in_threadpool(self.decode, u.data, u.label) for _, u in missing))
        try:  # submitting looks in the cache once more, which may be a network call (Redis)
            futures = await run_in_threadpool(self._submit, [d for d, _ in missing], pixels)
        except QueueFull as err:
            raise ApiError(429, "busy", f"the service is busy ({err}); retry shortly", {"Retry-After": "1"}) from err
        del pixels
        for (d, _), future in zip(missing, futures):
            found[d] = await asyncio.shield(asyncio.wrap_future(future))
        return digests, [found[d] for d in digests], hits

    def _lookup(self, digests: list[str]) -> dict[str, Entry | None]:
        """{digest: cached entry or None} of the distinct ``digests`` (a network call with Redis)."""
        return {d: self.batcher.cached(d) for d in dict.fromkeys(digests)}

    def _submit(self, digests: list[str], pixels: list[torch.Tensor]) -> list:
        return [self.batcher.submit(d, p) for d, p in zip(digests, pixels)]

    def encode(self, digests: list[str], entries: list[Entry], ks: list[int], dtype: str) -> bytes:
        """The response payload: Gather_k of ``entries`` for ``ks`` in transfer ``dtype``."""
        gathered = {k: torch.stack([entry[k] for entry in entries]) for k in ks}
        metadata = {"backbone": self.backbone, "fingerprint": self.fingerprint}
        return pack(gathered, dtype, digests, metadata)

    def close(self) -> None:
        self.batcher.close()

    def _run_batch(self, digests: list[str], pixels: torch.Tensor) -> list[Entry]:
        gathered = self.gather(pixels, self.ks)
        return [{k: gathered[k][i].clone() for k in self.ks} for i in range(len(digests))]


def check_token(token: str) -> None:
    """Refuse a missing or guessable service token (shorter than MIN_TOKEN_LENGTH characters)."""
    if not token:
        raise DeltaVisionError("the feature service needs a token: pass --token or set DELTAVISION_TOKEN")
    if len(token) < MIN_TOKEN_LENGTH:
        raise DeltaVisionError(
            f"the service token has {len(token)} characters; use at least {MIN_TOKEN_LENGTH} "
            "(or pass none and let the service generate one)"
        )


def _probe_shape(gather: Gather, image_size: int):
    try:
        return gather.output_shape(image_size)
    except (AssertionError, RuntimeError, ValueError) as err:
        raise DeltaVisionError(f"image size {image_size} does not fit this backbone ({str(err)[:200]})") from err


def _native_size(model: nn.Module, resolved: dict) -> int:
    """The input size a fixed-size model was built for (ViT/Swin img_size option), else timm's default."""
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed and not getattr(model.patch_embed, "dynamic_img_size", False):
        return int(fixed[-1])
    return int(resolved["input_size"][-1])


def _fingerprint(model: nn.Module, backbone: str, options: dict, image_size: int, mean, std,
                 precision: str = "fp32") -> str:
    """Identity of the feature space: same fingerprint, same features for the same image bytes
    (up to floating-point rounding of the device; a precision other than fp32 is another space)."""
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = {
        "backbone": backbone,
        "options": {k: str(v) for k, v in sorted(options.items())},
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "gather": GATHER_VERSION,
        "decode": DECODE_VERSION,
        "weights": weights.hexdigest(),
    }
    if precision != "fp32":
        settings["precision"] = precision
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def build_service(
    backbone: str,
    config: ServiceConfig,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    image_size: int | None = None,
    backbone_options: dict[str, Any] | None = None,
    device: str | None = None,
    precision: str = "fp32",
    replica: str = "",
) -> FeatureService:
    """A service around a timm backbone built by :func:`deltavision.backbones.create_backbone`."""
    from timm.data import resolve_data_config

    from ...backbones import create_backbone
    from ...train.device import check_precision, resolve_device

    check_precision(resolve_device(device or "cpu"), precision)  # a device or precision that cannot run: fail first

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
        device=device,
        precision=precision,
        replica=replica,
    )
