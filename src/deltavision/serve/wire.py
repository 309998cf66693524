"""The feature payload both sides speak: safetensors bytes, never pickle.

A response holds, for every k asked for, ``features.k<k>`` of shape (B, T, C) in
the transfer dtype; with int8 also ``scale.k<k>`` of shape (B,) float32, one
symmetric scale per image (x ~= q * scale). Metadata (strings) name the k
values, the dtype, the backbone, the service fingerprint and, as a JSON list,
the sha256 of each image's bytes in request order.

Only torch, safetensors and the standard library are used here: the edge
imports this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT = "deltavision-mist-features/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
INT8_LEVELS = 127


class PayloadError(ValueError):
    """Bytes that are not a feature payload of this format."""


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
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "int8":
        quantized, scale = quantize_int8(features)
        return {"features": quantized, "scale": scale}
    return {"features": features.to(DTYPES[dtype])}


@dataclass
class FeaturePayload:
    """Decoded payload: per-k stored tensors (and int8 scales), in request order."""

    dtype: str
    hashes: list[str]
    features: dict[int, torch.Tensor]
    scales: dict[int, torch.Tensor]
    metadata: dict[str, str]

    @property
    def ks(self) -> list[int]:
        return sorted(self.features)

    def as_float32(self, k: int) -> torch.Tensor:
        return to_float32(self.features[k], self.scales.get(k))


def pack(gathered: dict[int, torch.Tensor], dtype: str, hashes: list[str], metadata: dict[str, str]) -> bytes:
    """Safetensors bytes for ``{k: float32 (B, T, C)}`` in transfer ``dtype``."""
    tensors = {}
    for k, features in gathered.items():
        for name, tensor in encode_for_transfer(features, dtype).items():
            tensors[f"{name}.k{k}"] = tensor.contiguous()
    header = {
        **metadata,
        "format": FORMAT,
        "dtype": dtype,
        "ks": ",".join(str(k) for k in sorted(gathered)),
        "hashes": json.dumps(hashes),
    }
    return save_safetensors(tensors, metadata=header)


def unpack(data: bytes) -> FeaturePayload:
    """Parse bytes made by :func:`pack`; PayloadError if they are anything else."""
    try:
        tensors = load_safetensors(data)
        metadata = _read_metadata(data)
    except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise PayloadError(f"not a feature payload ({err})") from err
    if metadata.get("format") != FORMAT or metadata.get("dtype") not in DTYPES:
        raise PayloadError(f"unexpected payload format {metadata.get('format')!r}")
    ks = [int(k) for k in metadata["ks"].split(",")]
    features = {k: tensors[f"features.k{k}"] for k in ks}
    scales = {k: tensors[f"scale.k{k}"] for k in ks if f"scale.k{k}" in tensors}
    return FeaturePayload(metadata["dtype"], json.loads(metadata["hashes"]), features, scales, metadata)


def _read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (8-byte little-endian header length, JSON header)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__") or {}
