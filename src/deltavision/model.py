"""The public model API: create, count, merge, save and load adapters."""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .anatomy import describe
from .anatomy.core import family_of
from .backbones import create_backbone
from .errors import AdapterFileError, IncompatibleMethodError, NewerVersionWarning
from .io import load_json, load_tensors, save_json, save_tensors
from .methods import get_method, make_config
from .methods.common import get_module, unfreeze

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STRUCTURE_FREE = {"full", "linear", "bitfit", "norm"}  # work on any timm model


@dataclass
class ModelSpec:
    """What a deltavision model is: enough to rebuild it around saved tensors."""

    backbone: str
    method: str
    num_classes: int
    options: dict[str, Any] = field(default_factory=dict)
    backbone_options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def create_model(
    backbone: str,
    method: str,
    num_classes: int,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    backbone_options: dict[str, Any] | None = None,
    **method_options: Any,
) -> nn.Module:
    """A timm ``backbone`` with ``method`` applied and a ``num_classes`` head.

    Only the method's parameters and the classifier require gradients. The
    model carries its :class:`ModelSpec` as ``model.deltavision``.
    """
    spec = get_method(method)
    make_config(spec, method_options)  # a bad option fails before any weights load
    model = create_backbone(
        backbone, num_classes, pretrained=pretrained, checkpoint=checkpoint, options=backbone_options
    )
    fresh_head = not (pretrained or checkpoint) or num_classes != model.pretrained_cfg.get("num_classes")
    return adapt(model, backbone, method, backbone_options, zero_head=fresh_head, **method_options)


def adapt(
    model: nn.Module,
    backbone: str,
    method: str,
    backbone_options: dict[str, Any] | None = None,
    zero_head: bool = True,
    **method_options,
) -> nn.Module:
    """Apply ``method`` to a built timm ``model`` in place: freeze it, add the method, free the classifier.

    A new classifier starts at zero (``zero_head``): timm's initialisation for
    some families (EfficientNet's uniform 1/sqrt(classes)) gives large first
    logits on un-normalised features, which slows linear probing badly.
    """
    spec = get_method(method)
    config = make_config(spec, method_options)
    anatomy = _anatomy_for(model, method, backbone)
    reason = _family_misfit(spec, anatomy.family, backbone)
    if reason:
        raise IncompatibleMethodError(reason)
    model.requires_grad_(False)
    spec.apply(model, anatomy, config)
    classifier = get_module(model, anatomy.classifier)
    if zero_head:
        for param in classifier.parameters():
            nn.init.zeros_(param)
    unfreeze(classifier)
    num_classes = model.num_classes
    model.deltavision = ModelSpec(
        backbone, method, num_classes, dataclasses.asdict(config), dict(backbone_options or {})
    )
    return model


def method_misfit(backbone: str, method: str, backbone_options: dict[str, Any] | None = None) -> str | None:
    """Why ``method`` cannot be applied to ``backbone`` (None if it can); builds no weights."""
    import timm

    spec = get_method(method)
    if method in STRUCTURE_FREE:
        return None
    family = family_of(timm.create_model(backbone, pretrained=False, **(backbone_options or {})))
    if family is None:
        return f"method {method!r} needs a backbone family deltavision knows; {backbone} is not one"
    return _family_misfit(spec, family, backbone)


def _family_misfit(spec, family: str, backbone: str) -> str | None:
    if spec.families is not None and family not in spec.families:
        return f"method {spec.name!r} supports {', '.join(sorted(spec.families))} backbones, not {family} ({backbone})"
    return None


def _anatomy_for(model: nn.Module, method: str, backbone: str):
    """The backbone's anatomy; structure-free methods also accept families deltavision does not know."""
    if family_of(model) is not None or method not in STRUCTURE_FREE:
        return describe(model)
    from .anatomy import Anatomy

    classifier = model.pretrained_cfg.get("classifier", "head")
    body = tuple(n for n, _ in model.named_children() if n != classifier.split(".")[0])
    return Anatomy("unknown", "unknown", 0, body, (), (), (), classifier)


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


def merge(model: nn.Module) -> nn.Module:
    """Fold the method into the backbone's weights and return the plain timm model.

    The result has the untouched backbone's modules and parameter count and
    the same eval-mode outputs. Methods that add inference-time structure
    cannot be merged and raise :class:`IncompatibleMethodError`.
    """
    spec = spec_of(model)
    method = get_method(spec.method)
    if getattr(model, "deltavision_shared_backbone", False):
        raise IncompatibleMethodError(
            "this task shares its backbone with other tasks, and merging would change them all; "
            "load its adapter on its own with load_adapter, then merge"
        )
    if not method.folds:
        raise IncompatibleMethodError(
            f"method {spec.method!r} adds modules that cannot be folded into the backbone; "
            "save it with save_adapter and load it with load_adapter instead"
        )
    method.merge(model, _anatomy_for(model, spec.method, spec.backbone))
    del model.deltavision
    model.requires_grad_(True)
    return model


def set_train_mode(model: nn.Module, training: bool = True) -> nn.Module:
    """``model.train(training)``, but BatchNorms keep their running statistics (eval mode)
    unless they train and the method trains whole layers (``full``, ``partial``): a frozen
    backbone stays frozen, and a method that only shifts or scales features (BitFit, norm
    tuning, adapters) adapts the features the pretrained statistics describe."""
    model.train(training)
    if training:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not _updates_statistics(model, module):
                module.eval()
    return model


def _updates_statistics(model: nn.Module, norm: nn.Module) -> bool:
    """Whether ``norm`` re-estimates its running statistics while ``model`` trains."""
    if not any(p.requires_grad for p in norm.parameters(recurse=False)):
        return False
    spec = getattr(model, "deltavision", None)
    return get_method(spec.method).batch_stats if isinstance(spec, ModelSpec) else True


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors: trainable parameters plus the running statistics of the
    BatchNorms that re-estimate them while training."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and _updates_statistics(model, module):
            for bname, buf in module.named_buffers(recurse=False):
                state[f"{name}.{bname}" if name else bname] = buf.detach()
    return state


def save_adapter(model: nn.Module, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` to ``directory``."""
    spec = spec_of(model)
    directory = Path(directory)
    config = {**spec.to_json(), "deltavision_version": __version__, **(extra or {})}
    save_tensors(adapter_state_dict(model), directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    save_json(config, directory / ADAPTER_CONFIG)
    return directory


CONFIG_TYPES = {
    "backbone": str, "method": str, "num_classes": int, "options": dict, "backbone_options": (dict, type(None)),
    "seed": int, "classes": list, "data": dict, "source": str, "deltavision_version": str,
}


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The adapter's JSON config, its required keys present and every known key of the right type.

    A config written by a newer deltavision gives a :class:`NewerVersionWarning`.
    """
    path = Path(directory) / ADAPTER_CONFIG
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
    _warn_if_newer(config.get("deltavision_version"), path)
    return config


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

    An adapter for another backbone, method, options or class count raises
    :class:`AdapterFileError` naming the difference.
    """
    config = read_adapter_config(directory)
    if model is None:
        if not pretrained and checkpoint is None and "seed" in config:
            torch.manual_seed(config["seed"])  # rebuild the random-init backbone it was trained on
        model = create_model(
            config["backbone"],
            config["method"],
            config["num_classes"],
            pretrained=pretrained,
            checkpoint=checkpoint,
            backbone_options=config.get("backbone_options") or None,
            **config.get("options", {}),
        )
    else:
        _check_same_spec(spec_of(model), config, directory)
    weights = Path(directory) / ADAPTER_WEIGHTS
    load_adapter_tensors(model, load_tensors(weights), weights)
    return model


def _check_same_spec(spec: ModelSpec, config: dict[str, Any], directory) -> None:
    for key in ("backbone", "method", "num_classes", "options", "backbone_options"):
        saved, ours = config.get(key), getattr(spec, key)
        if key in ("options", "backbone_options"):
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
