"""Building deltavision models: a timm backbone, a method applied to it, a fresh head; and merging back."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from ..anatomy import Anatomy, describe, family_of
from ..backbones import create_backbone
from ..errors import IncompatibleMethodError, MethodOptionError
from ..methods import get_method, make_config
from ..methods.base import MethodSpec
from ..methods.common import unfreeze
from ..methods.wrapper import BackboneWrapper
from ..options import config_options
from ..tasks.registry import get_task
from .modes import keep_statistics, release_all
from .state import ModelSpec, spec_of


def create_model(
    backbone: str,
    method: str,
    num_classes: int,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    backbone_options: dict[str, Any] | None = None,
    task: str = "classification",
    head: str | None = None,
    detector: str | None = None,
    head_options: dict[str, Any] | None = None,
    **method_options: Any,
) -> nn.Module:
    """A timm ``backbone`` with ``method`` applied and a ``num_classes`` head for ``task``.

    ``task="classification"``: the backbone's own classifier (``forward(images) -> (B, classes)``).
    ``task="segmentation"``: a :class:`~deltavision.tasks.segmentation.SegmentationModel`,
    ``head`` "upernet" (default) or "fpn", whose ``forward(images)`` gives
    ``(B, classes, H, W)`` logits.
    ``task="detection"`` (``detector`` "fasterrcnn", the default, or "retinanet")
    and ``task="instance"`` (Mask R-CNN): a torchvision detector (see
    :mod:`deltavision.tasks.detection`); ``num_classes`` counts the background,
    ``head_options`` may set ``image_size`` and ``fpn_channels``; ``detector``
    is another name for ``head``. Only the method's parameters and the head
    require gradients. The model carries its :class:`ModelSpec` as ``model.deltavision``.
    """
    spec = get_method(method)
    if detector is not None:
        if head is not None and head != detector:
            raise MethodOptionError(f"head={head!r} and detector={detector!r} disagree; pass one of them")
        head = detector
    head = resolve_head(task, head)
    entry = get_task(task)
    dense = entry.dense
    config = make_config(spec, method_options)  # a bad option fails before any weights load
    if dense and hasattr(config, "dense"):
        config = dataclasses.replace(config, dense=True)  # E3VA: stage norms for the dense head
    model = create_backbone(
        backbone, 0 if dense else num_classes, pretrained=pretrained, checkpoint=checkpoint, options=backbone_options
    )
    if not dense:
        fresh_head = not (pretrained or checkpoint) or num_classes != model.pretrained_cfg.get("num_classes")
        return _apply(model, backbone, spec, config, backbone_options, zero_head=fresh_head)
    adapted = _apply(model, backbone, spec, config, backbone_options, zero_head=False)
    model_spec = adapted.deltavision
    del adapted.deltavision
    _freeze_unused_final_layers(adapted, spec, backbone)
    if entry.segments:
        if head_options:
            raise MethodOptionError("segmentation heads take no head_options")
        from ..tasks.segmentation import SegmentationModel

        dense_model = SegmentationModel(adapted, num_classes, head=head)
    else:
        from ..tasks.detection import build_detector, check_head_options

        head_options = check_head_options(head_options)
        dense_model = build_detector(adapted, num_classes, head, head_options)
    dense_model.deltavision = dataclasses.replace(
        model_spec, num_classes=num_classes, task=task, head=head, head_options=dict(head_options or {})
    )
    return dense_model


def resolve_head(task: str, head: str | None) -> str | None:
    """The head of ``task`` with its default filled in; unknown tasks and heads are MethodOptionErrors."""
    entry = get_task(task)
    if not entry.dense:
        if head is not None:
            raise MethodOptionError("classification uses the backbone's own classifier; drop head=")
        return None
    if entry.segments:
        from ..tasks.segmentation import check_head

        return check_head(head)
    from ..tasks.detection import check_detector

    return check_detector(task, head)


def adapted_backbone(model: nn.Module) -> nn.Module:
    """The adapted timm model (or method wrapper) inside a deltavision model of any task."""
    path = get_task(spec_of(model).task).adapted_backbone
    return model.get_submodule(path) if path else model


def _freeze_unused_final_layers(model: nn.Module, spec: MethodSpec, backbone: str) -> None:
    """Dense heads read the stage outputs, never the final norm or the classifier: train nothing there."""
    inner = model.backbone if isinstance(model, BackboneWrapper) else model
    anatomy = _anatomy_for(inner, spec, backbone)
    for name in anatomy.final:
        inner.get_submodule(name).requires_grad_(False)


def adapt(
    model: nn.Module,
    backbone: str,
    method: str,
    backbone_options: dict[str, Any] | None = None,
    zero_head: bool = True,
    **method_options,
) -> nn.Module:
    """Apply ``method`` to a built timm ``model``: freeze it, add the method, free the classifier.

    Returns the adapted model: ``model`` itself, or the wrapper that owns it for
    a method with a forward of its own (E3VA). A new classifier starts at zero
    (``zero_head``): timm's initialisation for some families (EfficientNet's
    uniform 1/sqrt(classes)) gives large first logits on un-normalised
    features, which slows linear probing badly.
    """
    spec = get_method(method)
    return _apply(model, backbone, spec, make_config(spec, method_options), backbone_options, zero_head)


def _apply(model, backbone: str, spec: MethodSpec, config, backbone_options, zero_head: bool) -> nn.Module:
    anatomy = _anatomy_for(model, spec, backbone)
    model.requires_grad_(False)
    adapted = spec.apply(model, anatomy, config) or model
    classifier = adapted.get_classifier()
    if zero_head:
        for param in classifier.parameters():
            nn.init.zeros_(param)
    unfreeze(classifier)
    keep_statistics(adapted, spec.batch_stats)
    adapted.deltavision = ModelSpec(
        backbone, spec.name, model.num_classes, config_options(config), dict(backbone_options or {})
    )
    return adapted


def method_misfit(backbone: str, method: str, backbone_options: dict[str, Any] | None = None) -> str | None:
    """Why ``method`` cannot be applied to ``backbone`` (None if it can); builds no weights."""
    import timm

    spec = get_method(method)
    if spec.structure_free:
        return None
    family = family_of(timm.create_model(backbone, pretrained=False, **(backbone_options or {})))
    return spec.misfit(family.name if family else None, backbone)


def _anatomy_for(model: nn.Module, spec: MethodSpec, backbone: str) -> Anatomy:
    """The backbone's anatomy; structure-free methods also accept families deltavision does not know."""
    family = family_of(model)
    reason = spec.misfit(family.name if family else None, f"{backbone} ({type(model).__name__})")
    if reason:
        raise IncompatibleMethodError(reason)
    if family is not None:
        return describe(model)
    classifier = model.pretrained_cfg.get("classifier", "head")
    body = tuple(n for n, _ in model.named_children() if n != classifier.split(".")[0])
    return Anatomy("unknown", "unknown", 0, body, (), (), (), classifier)


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
    entry = get_task(spec.task)
    if entry.dense:
        owner_path, _, name = entry.adapted_backbone.rpartition(".")
        owner = model.get_submodule(owner_path)
        inner = getattr(owner, name)
        setattr(owner, name, method.merge(inner, _anatomy_for(inner, method, spec.backbone)) or inner)
        plain = model
    else:
        plain = method.merge(model, _anatomy_for(model, method, spec.backbone)) or model
    del plain.deltavision
    release_all(plain)
    plain.requires_grad_(True)
    return plain
