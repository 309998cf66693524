"""Where and in which precision a run computes: device choice, autocast, gradient scaling.

``auto`` picks CUDA, then Apple's MPS, then the CPU. ``bf16`` and ``fp16``
run the forward pass under :func:`torch.autocast`; ``fp16`` needs a gradient
scaler and is refused on the CPU (autocast there supports bf16 only), so the
bf16 path is the one testable without a GPU. Checkpoints and adapters are
always saved from CPU copies (:mod:`deltavision.io`), so they load anywhere.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..errors import DeltaVisionError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(DeltaVisionError):
    """A device or precision this machine cannot run."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a device that exists here."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _local_rank() % torch.cuda.device_count())
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: this machine has no CUDA GPU (torch sees none); use --device cpu")
        index = device.index if device.index is not None else _local_rank() % torch.cuda.device_count()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise DeviceError(f"--device {name}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def check_precision(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: fp32), refusing what cannot run."""
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise DeviceError("fp16 needs a GPU (autocast on the CPU supports bf16 only); use --precision bf16 or fp32")
    return PRECISIONS[precision]


def autocast(device: torch.device, precision: str):
    """The forward-pass context for ``precision``: autocast, or nothing for fp32."""
    dtype = check_precision(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler that is active for fp16 only (a no-op otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
