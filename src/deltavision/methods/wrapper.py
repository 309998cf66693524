"""Base of the methods that need a forward of their own (E3VA, VPT).

Such a method returns a :class:`BackboneWrapper` that owns the timm model as
its ``backbone`` child and runs it through the backbone's Family. To callers
the wrapper is a timm classifier: ``forward(images) -> logits``,
``get_classifier``, ``reset_classifier``, ``num_classes``, ``pretrained_cfg``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..anatomy import Anatomy, get_family


class BackboneWrapper(nn.Module):
    """A timm ``backbone`` (a child module) with the ``anatomy`` and Family it was adapted by.

    ``normalizes_features``: :meth:`feature_maps` already end in a trainable
    norm, so dense heads add none of their own."""

    normalizes_features = False

    def __init__(self, backbone: nn.Module, anatomy: Anatomy):
        super().__init__()
        self.backbone = backbone
        self.anatomy = anatomy
        self.family = get_family(anatomy.family)

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return self.backbone.pretrained_cfg

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.backbone.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier()

    def reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
        self.backbone.reset_classifier(num_classes, *args, **kwargs)

    def block(self, index: int) -> nn.Module:
        """The backbone's block ``index`` (in anatomy order)."""
        return self.backbone.get_submodule(self.anatomy.blocks[index].name)

    def feature_maps(self, images):
        """One NCHW map per stage, for dense heads (the backbone's own stage outputs unless overridden)."""
        return self.family.stage_outputs(self.backbone, images)

    def use_stages(self, stages: list[int]) -> None:
        """A dense head reads only these stages' maps: drop what would train for the others."""
