"""What a deltavision model is, and its adapter files: the trained tensors and a JSON config.

An adapter folder holds ``deltavision.safetensors`` (only the trained tensors)
and ``deltavision.json`` (backbone, method, options, classes, version, and the
run's settings). The names are our own: another library's file names with our
schema would make tools (the Hugging Face Hub's PEFT loader) offer a loading
recipe that fails. Folders written by deltavision 0.1.0 under PEFT's names
(``adapter_model.safetensors``, ``adapter_config.json``) still load.
Nothing here imports timm until a model must be rebuilt.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..defaults import VERSION as __version__
from ..errors import AdapterFileError, NewerVersionWarning
from ..io import load_json, load_tensors, save_json, save_tensors
from ..tasks.registry import TASKS
from .modes import updates_statistics

ADAPTER_WEIGHTS = "deltavision.safetensors"
ADAPTER_CONFIG = "deltavision.json"
LEGACY_WEIGHTS = "adapter_model.safetensors"
LEGACY_CONFIG = "adapter_config.json"


@dataclass
class ModelSpec:
    """What a deltavision model is: enough to rebuild it around saved tensors."""

    backbone: str
    method: str
    num_classes: int
    options: dict[str, Any] = field(default_factory=dict)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"
    head: str | None = None  # the dense head or detector ("upernet", "fpn", "fasterrcnn", ...); None for classification
    head_options: dict[str, Any] = field(default_factory=dict)  # detectors: image_size, fpn_channels

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def spec_of(model: nn.Module) -> ModelSpec:
    spec = getattr(model, "deltavision", None)
    if not isinstance(spec, ModelSpec):
        raise TypeError("expected a model made by deltavision.create_model")
    return spec


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"trainable": ..., "total": ...} parameter counts."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in params)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors: trainable parameters plus the running statistics of the
    BatchNorms that re-estimate them while training."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for name, module in model.named_modules():
        if updates_statistics(module):
            for bname, buf in module.named_buffers(recurse=False):
                state[f"{name}.{bname}" if name else bname] = buf.detach()
    return state


def save_adapter(model: nn.Module, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``deltavision.safetensors`` and ``deltavision.json`` to ``directory``."""
    spec = spec_of(model)
    directory = Path(directory)
    config = {**spec.to_json(), "deltavision_version": __version__, **(extra or {})}
    save_tensors(adapter_state_dict(model), directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    save_json(config, directory / ADAPTER_CONFIG)
    return directory


def adapter_files(directory: str | Path) -> tuple[Path, Path]:
    """(weights, config) of an adapter folder, under our names or the 0.1.0 ones."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).exists() and (directory / LEGACY_CONFIG).exists():
        return directory / LEGACY_WEIGHTS, directory / LEGACY_CONFIG
    return directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG


CONFIG_TYPES = {
    "backbone": str, "method": str, "num_classes": int, "options": dict, "backbone_options": (dict, type(None)),
    "seed": int, "classes": list, "data": dict, "source": str, "deltavision_version": str, "run": dict,
    "task": str, "head": (str, type(None)), "head_options": dict,
}


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The adapter's JSON config, its required keys present and every known key of the right type.

    ``directory`` may be an ``hf-hub:org/name[@revision]`` id (see :func:`.hub.resolve_adapter`).
    A config written by a newer deltavision gives a :class:`NewerVersionWarning`.
    """
    path = adapter_files(_local(directory))[1]
    config = load_json(path)
    missing = [k for k in ("backbone", "method", "num_classes") if k not in config]
    if missing:
        raise AdapterFileError(f"{path} lacks {', '.join(missing)}")
    for key, types in CONFIG_TYPES.items():
        value = config.get(key)
        if key in config and (not isinstance(value, types) or isinstance(value, bool)):
            raise AdapterFileError(f"{path}: {key} should be {_type_names(types)}, not {value!r}")
    if config["num_classes"] < 1:
        raise AdapterFileError(f"{path}: num_classes should be at least 1, not {config['num_classes']}")
    if config.get("task", "classification") not in TASKS:
        raise AdapterFileError(f"{path}: task should be one of {', '.join(TASKS)}, not {config['task']!r}")
    _warn_if_newer(config.get("deltavision_version"), path)
    return config


def _local(source: str | Path) -> Path:
    """The local folder of an adapter source (a hub id is fetched)."""
    from .hub import resolve_adapter

    return resolve_adapter(source)


def _type_names(types) -> str:
    names = {str: "a string", int: "an integer", dict: "an object", list: "a list", type(None): "null"}
    return " or ".join(names[t] for t in (types if isinstance(types, tuple) else (types,)))


def _warn_if_newer(version: str | None, path: Path) -> None:
    if version and _version_key(version) > _version_key(__version__):
        warnings.warn(
            f"{path} was written by deltavision {version}, newer than this {__version__}; "
            "it may not load as intended (upgrade deltavision)",
            NewerVersionWarning, stacklevel=3,
        )


def _version_key(version: str) -> tuple[int, ...]:
    """The leading numeric parts of a version string: "0.10.2rc1" -> (0, 10, 2)."""
    parts = []
    for part in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def load_adapter(
    directory: str | Path,
    model: nn.Module | None = None,
    *,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
) -> nn.Module:
    """Rebuild the model an adapter was trained on (or use ``model``) and load its tensors.

    ``directory`` is a local folder or an ``hf-hub:org/name[@revision]`` id
    (downloaded once into the Hugging Face cache). An adapter for another
    backbone, method, options or class count raises :class:`AdapterFileError`
    naming the difference.
    """
    directory = _local(directory)
    config = read_adapter_config(directory)
    if model is None:
        from .build import create_model

        if not pretrained and checkpoint is None and "seed" in config:
            torch.manual_seed(config["seed"])  # rebuild the random-init backbone it was trained on
        model = create_model(
            config["backbone"],
            config["method"],
            config["num_classes"],
            pretrained=pretrained,
            checkpoint=checkpoint,
            backbone_options=config.get("backbone_options") or None,
            task=config.get("task", "classification"),
            head=config.get("head"),
            head_options=config.get("head_options") or None,
            **config.get("options", {}),
        )
    else:
        _check_same_spec(spec_of(model), config, directory)
    weights = adapter_files(directory)[0]
    load_adapter_tensors(model, load_tensors(weights), weights)
    return model


def _check_same_spec(spec: ModelSpec, config: dict[str, Any], directory) -> None:
    defaults = {"task": "classification"}
    for key in ("backbone", "method", "num_classes", "options", "backbone_options", "task", "head", "head_options"):
        saved, ours = config.get(key, defaults.get(key)), getattr(spec, key)
        if key in ("options", "backbone_options", "head_options"):
            saved = saved or {}
            ours = {k: list(v) if isinstance(v, tuple) else v for k, v in ours.items()}
        if saved != ours:
            raise AdapterFileError(f"adapter {directory} was saved for {key}={saved!r}, but the model has {ours!r}")


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source) -> None:
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"{source} does not fit this model: {len(missing)} tensors missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{source} holds NaN or infinite values in {name}; it cannot be used")
        if tensor.shape != expected[name].shape:
            raise AdapterFileError(
                f"{source} does not fit this model: {name} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[name].shape)} (another backbone or class count?)"
            )
    with torch.no_grad():
        state = dict(model.named_parameters()) | dict(model.named_buffers())
        for name, tensor in tensors.items():
            state[name].copy_(tensor)
