"""Mona: multi-cognitive visual adapter (Yin et al., "5%>100%", Sec. 3.2, Fig. 2).

One Mona module on a stream x of width m, inner width n (64):

    z  = LN(x) * gamma + x * gamma_x          scaled LayerNorm (gamma = 1e-6, gamma_x = 1)
    d  = W_down z                              m -> n
    d  = d + mean(DW3(d), DW5(d), DW7(d))      multi-cognitive depth-wise filters on the H x W grid
    d  = d + PW1x1(d)                          aggregation
    x' = x + W_up(dropout(GELU(d)))            n -> m

Initialisation as the official code's (its backbones' ``_init_weights``): the
down- and up-projection weights trunc-normal with std 0.02, their biases zero;
the convolutions keep PyTorch's defaults.

Parameters (Eq. 6): 4m (LN and scales) + 2mn + n + m (projections)
+ (9 + 25 + 49) n + 3n (depth-wise) + n^2 + n (1x1) per module.

Placement: transformer blocks get two, after the attention residual add (the
stream the MLP reads) and after the MLP residual add. ViT prefix tokens (class,
register) take the token-wise path but bypass the convolutions, and the patch
tokens are laid on their grid for whatever image size is fed. ConvNeXt and
EfficientNet blocks have a single residual branch, so they get one Mona on the
block output, the equivalent of the transformer's second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..anatomy.layout import Grid, from_channels_last, join_tokens, split_tokens, to_channels_last
from ..anatomy.taps import install_taps
from ..errors import MethodOptionError
from .registry import register_method


@dataclass
class MonaConfig:
    width: int = 64
    dropout: float = 0.1

    def __post_init__(self):
        if self.width < 1:
            raise MethodOptionError(f"mona: width must be positive, got {self.width}")
        if not 0.0 <= self.dropout < 1.0:
            raise MethodOptionError(f"mona: dropout must be in [0, 1), got {self.dropout}")


class MultiCognitiveFilter(nn.Module):
    """d + mean of 3x3, 5x5, 7x7 depth-wise convolutions, then + a 1x1 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.ModuleList(
            nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels) for k in (3, 5, 7)
        )
        self.pointwise = nn.Conv2d(channels, channels, 1)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        d = d + sum(conv(d) for conv in self.depthwise) / len(self.depthwise)
        return d + self.pointwise(d)


class Mona(nn.Module):
    def __init__(self, channels: int, width: int = 64, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.gamma = nn.Parameter(torch.full((channels,), 1e-6))
        self.gamma_x = nn.Parameter(torch.ones(channels))
        self.down = nn.Linear(channels, width)
        self.filter = MultiCognitiveFilter(width)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(width, channels)
        for projection in (self.down, self.up):
            nn.init.trunc_normal_(projection.weight, std=0.02)
            nn.init.zeros_(projection.bias)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        stream = to_channels_last(x, grid)
        z = self.norm(stream) * self.gamma + stream * self.gamma_x
        prefix, patch_map = split_tokens(self.down(z), grid)
        d = join_tokens(prefix, self.filter(patch_map), grid)
        out = stream + self.up(self.dropout(self.act(d)))
        return from_channels_last(out, grid)


def mona_parameter_count(channels: int, width: int = 64) -> int:
    """Eq. 6 of the Mona paper, for one module."""
    m, n = channels, width
    return 4 * m + (2 * m * n + n + m) + (9 + 25 + 49) * n + 3 * n + (n * n + n)


@register_method(
    "mona", MonaConfig, "multi-cognitive convolutional adapters (two per transformer block)", default_lr=1e-3,
    owns="dv_taps",
)
def apply_mona(model: nn.Module, anatomy, config: MonaConfig) -> None:
    for info, taps in zip(anatomy.blocks, install_taps(model, anatomy)):
        if info.kind == "transformer":
            taps.after_attn.append(Mona(info.width, config.width, config.dropout))
        taps.after_block.append(Mona(info.width, config.width, config.dropout))
