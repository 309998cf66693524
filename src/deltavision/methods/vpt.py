"""VPT: visual prompt tuning (Jia et al., ECCV 2022, Sec. 3.2, Eq. 4-7).

``num_tokens`` learnable prompt tokens are inserted after the prefix (class,
register) tokens once the patches are embedded (VPT-Shallow); with
``deep=true`` every later block gets its own prompts in their place
(VPT-Deep). Prompts are initialised uniformly in +-sqrt(6 / (3 p^2 + C)), as
Xavier for a patch-sized fan-in. They are counted as prefix tokens, so the
head's average pooling and timm's intermediate-feature helpers leave them out,
while the position embedding is still resampled for the real prefix only. ViT-style token
backbones only.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
from torch import nn

from ..anatomy.taps import Grid, install_taps
from ..errors import MethodOptionError
from .registry import register_method


@dataclass
class VPTConfig:
    num_tokens: int = 10
    deep: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if self.num_tokens < 1:
            raise MethodOptionError(f"vpt: num_tokens must be positive, got {self.num_tokens}")


def _prompt(num_tokens: int, channels: int, patch_size: int) -> nn.Parameter:
    bound = math.sqrt(6.0 / (3 * patch_size * patch_size + channels))
    return nn.Parameter(torch.empty(1, num_tokens, channels).uniform_(-bound, bound))


class PromptInsert(nn.Module):
    """After ``inner`` (the embedding's last module): [prefix, prompts, patches]."""

    def __init__(self, inner: nn.Module, prompts: nn.Parameter, num_prefix_tokens: int, dropout: float):
        super().__init__()
        self.inner = inner
        self.prompts = prompts
        self.num_prefix_tokens = num_prefix_tokens
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inner(x)
        prompts = self.dropout(self.prompts).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, : self.num_prefix_tokens], prompts, x[:, self.num_prefix_tokens :]], dim=1)


class PromptReplace(nn.Module):
    """Before a block: swap the previous block's prompt outputs for this block's prompts."""

    def __init__(self, prompts: nn.Parameter, num_prefix_tokens: int, dropout: float):
        super().__init__()
        self.prompts = prompts
        self.num_prefix_tokens = num_prefix_tokens
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        start, stop = self.num_prefix_tokens, self.num_prefix_tokens + self.prompts.shape[1]
        prompts = self.dropout(self.prompts).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :start], prompts, x[:, stop:]], dim=1)


@register_method("vpt", VPTConfig, "learnable prompt tokens, shallow or deep (VPT)", families={"vit"}, owns="prompts")
def apply_vpt(model: nn.Module, anatomy, config: VPTConfig) -> None:
    channels, prefix = anatomy.blocks[0].width, anatomy.num_prefix_tokens
    first = _prompt(config.num_tokens, channels, anatomy.patch_size)
    model.norm_pre = PromptInsert(model.norm_pre, first, prefix, config.dropout)
    if config.deep:
        for taps in install_taps(model, anatomy)[1:]:
            taps.before_block.append(PromptReplace(_prompt(config.num_tokens, channels, anatomy.patch_size),
                                                   prefix, config.dropout))
    model.num_prefix_tokens = prefix + config.num_tokens
    object.__setattr__(model, "dv_prefix_before_prompts", prefix)
    model._pos_embed = types.MethodType(_pos_embed_before_prompts, model)


def _pos_embed_before_prompts(self, x: torch.Tensor) -> torch.Tensor:
    """timm's position embedding, which must count only the real prefix tokens
    (it resamples ``pos_embed`` for other image sizes); the prompts come later."""
    with_prompts = self.num_prefix_tokens
    self.num_prefix_tokens = self.dv_prefix_before_prompts
    try:
        return type(self)._pos_embed(self, x)
    finally:
        self.num_prefix_tokens = with_prompts
