"""Baselines without extra structure: full, linear, BitFit, norm tuning, partial-k.

Definitions follow the baselines of SSF (Lian et al., 2022, Sec. 4.1 / Table 5)
and VPT (Jia et al., 2022, Sec. 4): *full* tunes every weight, *linear* only
the classifier, *bitfit* the biases (Zaken et al.), *norm* the affine
parameters of the normalisation layers, *partial-k* the last k blocks with
the final norm. The classifier is always trained (``create_model`` sees to
that). None of them adds modules, so each model is already a plain timm model
and ``merge`` returns it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import MethodOptionError
from .common import NORM_TYPES, body_named_modules, get_module, unfreeze
from .registry import register_method


@dataclass
class NoOptions:
    """The options of a baseline that has none."""


def _nothing_to_fold(model: nn.Module, anatomy) -> None:
    """These methods add no modules; the trained model is already plain."""


@register_method(
    "full", NoOptions, "every weight of the backbone and the head", merge=_nothing_to_fold, default_lr=1e-3,
    batch_stats=True, structure_free=True, shares_backbone=False,
)
def apply_full(model: nn.Module, anatomy, config: NoOptions) -> None:
    unfreeze(model)


@register_method(
    "linear", NoOptions, "the classifier only (linear probing)", merge=_nothing_to_fold, structure_free=True,
    backprops_backbone=False,
)
def apply_linear(model: nn.Module, anatomy, config: NoOptions) -> None:
    """Only the classifier trains; create_model unfreezes it."""


# Learned biases added to attention logits (Swin, BEiT): bias terms as much as a layer's bias.
ATTENTION_BIAS_TABLES = ("relative_position_bias_table",)


@register_method(
    "bitfit", NoOptions, "every bias term (BitFit), attention relative-position bias tables included",
    merge=_nothing_to_fold, structure_free=True, shares_backbone=False,
)
def apply_bitfit(model: nn.Module, anatomy, config: NoOptions) -> None:
    for _, module in body_named_modules(model, anatomy):
        for name in ("bias", *ATTENTION_BIAS_TABLES):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(True)


@register_method(
    "norm", NoOptions, "affine weights of every normalisation layer", merge=_nothing_to_fold, structure_free=True,
    shares_backbone=False,
)
def apply_norm(model: nn.Module, anatomy, config: NoOptions) -> None:
    for _, module in body_named_modules(model, anatomy):
        if isinstance(module, NORM_TYPES):
            unfreeze(module)


@dataclass
class PartialConfig:
    k: int = 1

    def __post_init__(self):
        if self.k < 1:
            raise MethodOptionError(f"partial: k must be at least 1, got {self.k}")


@register_method(
    "partial", PartialConfig, "the last k blocks and the final norm", merge=_nothing_to_fold, default_lr=1e-3,
    batch_stats=True, shares_backbone=False,
)
def apply_partial(model: nn.Module, anatomy, config: PartialConfig) -> None:
    if config.k > len(anatomy.blocks):
        raise MethodOptionError(f"partial: k={config.k} but the backbone has only {len(anatomy.blocks)} blocks")
    for block in anatomy.last_blocks(config.k):
        unfreeze(get_module(model, block.name))
    for name in anatomy.final:
        unfreeze(get_module(model, name))
    first_trained = len(anatomy.blocks) - config.k
    for stage in anatomy.stages:
        if stage.downsample and stage.blocks[0] >= first_trained:
            unfreeze(get_module(model, stage.downsample))
