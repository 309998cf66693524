"""Bottleneck adapters: Houlsby (serial) and AdaptFormer (parallel).

Houlsby et al., ICML 2019, Sec. 2.1 (as used by SSF Sec. 3.1 and Mona Sec. 4.1):
an adapter h + W_up(act(W_down h)) after the MSA and after the MLP of every
block, on the branch output before the residual add; width 64.

AdaptFormer (Chen et al., NeurIPS 2022, Sec. 3.2, Eq. 3-4): a bottleneck
s * W_up(ReLU(W_down x)) beside the MLP, reading the stream that enters the
MLP branch, with s = 0.1.

Both start as the identity (W_up = 0), so training starts from the backbone.
On ConvNeXt and EfficientNet blocks, which have one residual branch, the
adapter takes that branch's place ("main"); AdaptFormer skips EfficientNet
blocks without a skip connection (they change width or resolution, so there is
no stream for a parallel branch to be added to).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..anatomy.layout import Grid, from_channels_last, to_channels_last
from ..anatomy.taps import install_taps
from ..errors import MethodOptionError
from .registry import register_method


class Bottleneck(nn.Module):
    """scale * W_up(act(W_down x)) on the channel axis; W_up starts at zero."""

    def __init__(self, channels: int, width: int, act: type[nn.Module], scale: float = 1.0):
        super().__init__()
        self.down = nn.Linear(channels, width)
        self.act = act()
        self.up = nn.Linear(width, channels)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        y = self.up(self.act(self.down(to_channels_last(x, grid)))) * self.scale
        return from_channels_last(y, grid)


class SerialAdapter(Bottleneck):
    """h + bottleneck(h)."""

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        return x + super().forward(x, grid)


def _check_width(name: str, width: int) -> None:
    if width < 1:
        raise MethodOptionError(f"{name}: width must be positive, got {width}")


@dataclass
class HoulsbyConfig:
    width: int = 64

    def __post_init__(self):
        _check_width("houlsby", self.width)


@register_method("houlsby", HoulsbyConfig, "bottleneck adapters after MSA and MLP (Houlsby)", owns="dv_taps")
def apply_houlsby(model: nn.Module, anatomy, config: HoulsbyConfig) -> None:
    for info, taps in zip(anatomy.blocks, install_taps(model, anatomy)):
        for branch in info.branches:
            taps.branch_out[branch] = SerialAdapter(info.width, config.width, nn.GELU)


@dataclass
class AdaptFormerConfig:
    width: int = 64
    scale: float = 0.1

    def __post_init__(self):
        _check_width("adaptformer", self.width)


@register_method("adaptformer", AdaptFormerConfig, "scaled bottleneck beside every MLP (AdaptFormer)", owns="dv_taps")
def apply_adaptformer(model: nn.Module, anatomy, config: AdaptFormerConfig) -> None:
    for info, taps in zip(anatomy.blocks, install_taps(model, anatomy)):
        if not info.has_skip:
            continue
        branch = info.branches[-1]
        taps.parallel[branch] = Bottleneck(info.width, config.width, nn.ReLU, config.scale)
