"""Exporting a saved adapter for deployment: ONNX (run it with onnxruntime) or TorchScript.

A method that folds (SSF, LoRA and the baselines) is merged first, so the
export is the plain timm graph with no trace of the method; the others (Mona,
the adapters, E3VA, VPT) are exported with their modules. The batch axis is
dynamic. Every export is checked before it is kept: the written file is run on
a batch of another size than the one traced, and its logits must match the
PyTorch model's within ``tolerance``; otherwise nothing is written.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ExportError
from .io import atomic_write, refuse_overwrite
from .tasks.registry import get_task

FORMATS = ("onnx", "torchscript")
TRACE_BATCH, CHECK_BATCH = 2, 3  # traced with one batch size, verified with another: the batch axis is dynamic
DEFAULT_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "images", "logits"


@dataclass
class ExportResult:
    path: Path
    format: str
    image_size: int
    merged: bool  # the method was folded into the backbone (a plain timm graph)
    max_difference: float  # largest |logit| difference between the written file and PyTorch


def export_adapter(
    adapter: str | Path,
    out: str | Path,
    format: str = "onnx",
    *,
    image_size: int | None = None,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
) -> ExportResult:
    """Export the model of a saved adapter (a folder or an ``hf-hub:`` id) to ``out``.

    The input size is ``image_size``, else the run's, else the backbone's.
    Raises :class:`ExportError` if the export fails or does not match PyTorch.
    """
    from .methods import get_method
    from .model import load_adapter, merge, read_adapter_config, resolve_adapter

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    refuse_overwrite(out, overwrite)
    folder = resolve_adapter(adapter)
    config = read_adapter_config(folder)
    if get_task(config.get("task", "classification")).detects:
        raise ExportError(
            f"{adapter} is a {config['task']} model: exporting torchvision's detectors (list-of-dicts outputs, "
            "data-dependent NMS) is not supported; use it from Python or `deltavision predict`"
        )
    model = load_adapter(folder, pretrained=pretrained, checkpoint=checkpoint)
    merged = get_method(config["method"]).folds
    if merged:
        model = merge(model)
    model.eval().requires_grad_(False)
    size = image_size or run_image_size(config) or native_image_size(model)
    generator = torch.Generator().manual_seed(0)
    traced_with = torch.randn(TRACE_BATCH, 3, size, size, generator=generator)
    checked_with = torch.randn(CHECK_BATCH, 3, size, size, generator=generator)
    with torch.no_grad():
        expected = model(checked_with)
    differences: list[float] = []

    def write(tmp: str) -> None:
        EXPORTERS[format](model, traced_with, tmp)
        actual = RUNNERS[format](tmp, checked_with)
        differences.append(float((actual - expected).abs().max()))
        if not differences[0] <= tolerance:  # NaN fails too
            raise ExportError(
                f"the {format} export of {adapter} differs from PyTorch by up to {differences[0]:.3g} "
                f"(tolerance {tolerance:g}); {out} was not written"
            )

    atomic_write(out, write)
    return ExportResult(out, format, size, merged, differences[0])


def run_image_size(config: dict[str, Any]) -> int | None:
    """The input size the adapter's run trained at, if it recorded one."""
    size = (config.get("data") or {}).get("image_size") or (config.get("run") or {}).get("image_size")
    return int(size) if size else None


def native_image_size(model: nn.Module) -> int:
    """The input size a fixed-size model was built for (a ViT/Swin ``img_size``), else its pretrained config's."""
    from timm.data import resolve_data_config

    timm_model = model.backbone if isinstance(getattr(model, "backbone", None), nn.Module) else model
    embed = getattr(timm_model, "patch_embed", None)
    fixed = getattr(embed, "img_size", None)
    if fixed and not getattr(embed, "dynamic_img_size", False):
        return int(fixed[-1])
    return int(resolve_data_config(model=timm_model)["input_size"][-1])


# --- ONNX -------------------------------------------------------------------------------------------


def export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """torch.onnx's exporter (torch.export based): one self-contained file, dynamic batch axis."""
    _require("onnxscript", "ONNX export")
    batch = torch.export.Dim("batch")
    try:
        with _quiet():
            torch.onnx.export(
                model, (example,), path, dynamo=True, external_data=False, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
            )
    except Exception as err:  # the exporter raises many unrelated types; all mean "this model did not export"
        raise ExportError(f"ONNX export failed: {_first_line(err)}") from err


def run_onnx(path: str, images: torch.Tensor) -> torch.Tensor:
    """Logits of an ONNX file run by onnxruntime on the CPU."""
    ort = _require("onnxruntime", "checking an ONNX export")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
    return torch.from_numpy(logits)


# --- TorchScript ------------------------------------------------------------------------------------


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """A traced TorchScript module (loadable with ``torch.jit.load``, no deltavision or timm needed)."""
    try:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)  # checked below, on another batch size
            torch.jit.save(traced, path)
    except Exception as err:  # as for ONNX: any failure means "this model did not trace"
        raise ExportError(f"TorchScript export failed: {_first_line(err)}") from err


def run_torchscript(path: str, images: torch.Tensor) -> torch.Tensor:
    with _quiet(), torch.no_grad():
        return torch.jit.load(path, map_location="cpu")(images)


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}
RUNNERS = {"onnx": run_onnx, "torchscript": run_torchscript}


@contextlib.contextmanager
def _quiet():
    """Hide the exporters' progress prints and tracer/deprecation warnings (the result is verified instead)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _require(module: str, purpose: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ExportError(f"{purpose} needs {module}: pip install 'deltavision[export]'") from err


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
