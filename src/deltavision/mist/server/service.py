"""The feature service: a frozen backbone answering Gather_k per image (MIST, Sec. 2.2).

:class:`FeatureService` decodes images, computes every candidate k in one pass
per image, keeps the result in a content-addressed LRU (:mod:`.cache`) and
micro-batches concurrent requests (:mod:`.batcher`); :mod:`.app` puts it behind
HTTP. :class:`ApiError` is how it refuses input (an HTTP status and a stable code).
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
from .cache import Entry, FeatureLRU
from .gather import Gather

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
        self.gather = Gather(model)
        self.ks = self.gather.ks
        self.shape = _probe_shape(self.gather, image_size)
        self.transform = make_transforms(image_size, self.mean, self.std, augment=False)[1]
        self.fingerprint = _fingerprint(model, backbone, backbone_options or {}, image_size, self.mean, self.std)
        self.counters = Counters()
        self._decoding = threading.BoundedSemaphore(config.decode_slots)  # bounds decoded-image memory
        self.batcher = MicroBatcher(
            self._run_batch, FeatureLRU(config.cache_bytes), config.max_batch, config.max_wait_ms / 1000.0,
            config.max_pending,
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

    async def features(self, images: list[bytes]) -> tuple[list[str], list[Entry], int]:
        """(digests, {k: features} per image, cache hits) for encoded ``images``."""
        digests = [digest(data) for data in images]
        by_digest = dict(zip(digests, images))  # equal digests, equal bytes
        found = {d: self.batcher.cached(d) for d in dict.fromkeys(digests)}
        hits = sum(entry is not None for entry in found.values())
        missing = [(d, by_digest[d]) for d, entry in found.items() if entry is None]
        pixels = await asyncio.gather(*(run_in_threadpool(self.decode, data) for _, data in missing))
        try:
            futures = [self.batcher.submit(d, p) for (d, _), p in zip(missing, pixels)]
        except QueueFull as err:
            raise ApiError(429, "busy", f"the service is busy ({err}); retry shortly", {"Retry-After": "1"}) from err
        for (d, _), future in zip(missing, futures):
            found[d] = await asyncio.shield(asyncio.wrap_future(future))
        return digests, [found[d] for d in digests], hits

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


def _fingerprint(model: nn.Module, backbone: str, options: dict, image_size: int, mean, std) -> str:
    """Identity of the feature space: same fingerprint, same features for the same image bytes."""
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = {
        "backbone": backbone,
        "options": {k: str(v) for k, v in sorted(options.items())},
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "gather": GATHER_VERSION,
        "weights": weights.hexdigest(),
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

    from ...backbones import create_backbone

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
