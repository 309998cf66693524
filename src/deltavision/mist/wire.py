"""The feature payload both sides speak: safetensors bytes, never pickle.

A response holds, for every k asked for, ``features.k<k>`` of shape (B, T, C) in
the transfer dtype; with int8 also ``scale.k<k>`` of shape (B,) float32, one
symmetric scale per image (x ~= q * scale). Metadata (strings) name the k
values, the dtype, the backbone, the service fingerprint and, as a JSON list,
the digest (sha256 of the encoded bytes) of each image in request order.

Payloads are serialised here, not by ``safetensors.torch.save``: that one
writes its header from a hash map, so the same tensors came out as different
bytes from call to call. :func:`serialise` sorts tensor names and metadata keys,
so identical answers are identical bytes; any safetensors reader loads them.

:func:`transfer_dtype` is the one check of a transfer dtype name. Only torch,
safetensors and the standard library are used here: the edge imports this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ..errors import DeltaVisionError

FORMAT = "deltavision-mist-features/2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
INT8_LEVELS = 127
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.int8: "I8"}


class PayloadError(ValueError):
    """Bytes that are not a feature payload of this format."""


class UnknownDtypeError(DeltaVisionError, ValueError):
    """A transfer dtype that is none of :data:`DTYPES`."""


def digest(data: bytes) -> str:
    """An image's identity on both sides of the wire: the sha256 of its encoded bytes (hex)."""
    return hashlib.sha256(data).hexdigest()


def transfer_dtype(name: str) -> torch.dtype:
    """The torch dtype of transfer dtype ``name``; UnknownDtypeError for any other name."""
    if name not in DTYPES:
        raise UnknownDtypeError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def quantize_int8(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per image (dim 0): ``(q, scale)``, ``features ~= q * scale``."""
    peak = features.abs().flatten(1).amax(dim=1).float()
    scale = torch.where(peak > 0, peak / INT8_LEVELS, torch.ones_like(peak))
    ratio = features.float() / scale.view(-1, *([1] * (features.dim() - 1)))
    return ratio.round().clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8), scale


def to_float32(stored: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Stored features (float32, float16, or int8 with per-image ``scale``) as float32."""
    values = stored.float()
    if scale is None:
        return values
    return values * scale.float().view(-1, *([1] * (stored.dim() - 1)))


def encode_for_transfer(features: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """``{"features": ..., ["scale": ...]}`` of float32 (B, T, C) ``features`` in transfer ``dtype``."""
    target = transfer_dtype(dtype)
    if dtype == "int8":
        quantized, scale = quantize_int8(features)
        return {"features": quantized, "scale": scale}
    return {"features": features.to(target)}


@dataclass
class FeaturePayload:
    """Decoded payload: per-k stored tensors (and int8 scales), in request order."""

    dtype: str
    digests: list[str]
    features: dict[int, torch.Tensor]
    scales: dict[int, torch.Tensor]
    metadata: dict[str, str]

    @property
    def ks(self) -> list[int]:
        return sorted(self.features)

    def as_float32(self, k: int) -> torch.Tensor:
        return to_float32(self.features[k], self.scales.get(k))


def serialise(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Safetensors bytes with a deterministic header: names and metadata keys sorted, no whitespace."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def pack(gathered: dict[int, torch.Tensor], dtype: str, digests: list[str], metadata: dict[str, str]) -> bytes:
    """Safetensors bytes for ``{k: float32 (B, T, C)}`` in transfer ``dtype``."""
    tensors = {}
    for k, features in gathered.items():
        for name, tensor in encode_for_transfer(features, dtype).items():
            tensors[f"{name}.k{k}"] = tensor
    header = {
        **metadata,
        "format": FORMAT,
        "dtype": dtype,
        "ks": ",".join(str(k) for k in sorted(gathered)),
        "digests": json.dumps(digests),
    }
    return serialise(tensors, header)


def unpack(data: bytes) -> FeaturePayload:
    """Parse bytes made by :func:`pack`; PayloadError if they are anything else."""
    try:
        tensors = load_safetensors(data)
        metadata = _read_metadata(data)
        if metadata.get("format") != FORMAT or metadata.get("dtype") not in DTYPES:
            raise PayloadError(f"unexpected payload format {metadata.get('format')!r}")
        ks = [int(k) for k in metadata["ks"].split(",")]
        features = {k: tensors[f"features.k{k}"] for k in ks}
        digests = json.loads(metadata["digests"])
    except PayloadError:
        raise
    except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise PayloadError(f"not a feature payload ({err})") from err
    scales = {k: tensors[f"scale.k{k}"] for k in ks if f"scale.k{k}" in tensors}
    return FeaturePayload(metadata["dtype"], digests, features, scales, metadata)


def _read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (8-byte little-endian header length, JSON header)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__") or {}
