"""E3VA: parameter-, memory- and time-efficient visual adapter (Yin et al., MM 2024, Sec. 3).

A trainable "gradient highway" runs beside the frozen backbone (Sec. 3.2,
Fig. 2). The backbone runs without autograd; its branch outputs feed parallel
adapters whose outputs are summed along the highway:

    e_0 = embedding output (a copy),   e_{i+1} = e_i + A1(a_i) + A2(m_i)

with a_i and m_i block i's attention- and MLP-branch outputs. Each adapter is
A(x) = x + U(GELU(D(x))) with middle width half the input width, and U and D
are Dual Low-Rank Branches (Sec. 3.3): W = s1 t1 + s2 t2, rank alpha = 8, 16
or 32 (E3VA, E3VA+, E3VA++), i.e. 2 alpha (m + n) weights plus a bias per
projection. U starts at zero, so the untrained highway reproduces the
backbone (e_i = l_i for every block). At stage boundaries the highway passes
through frozen copies of the backbone's downsampling layers (Sec. 3.2,
"Downsampling"). The classifier reads the last stage through the backbone's
final layers, whose norms become trainable. With ``dense=true`` every stage
output also gets a trainable norm (the paper's norms before the FPN) and
``E3VAModel.features`` returns the multi-scale maps for dense-prediction heads.

The method returns an :class:`E3VAModel` owning the backbone (``backbone.*``)
and the highway (``highway.*``).

Families: transformers as in the paper (ViT, Swin); single-branch convolutional
blocks get one adapter each. Blocks without an identity skip (EfficientNet's
resolution- or width-changing blocks, ResNet's blocks with a projection
shortcut) have no branch to adapt, so the highway passes them through frozen
copies, the analogue of Swin's inherited patch merging.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..anatomy.layout import to_nchw_map
from ..errors import IncompatibleMethodError, MethodOptionError
from .common import get_module, unfreeze
from .registry import register_method
from .wrapper import BackboneWrapper


@dataclass
class E3VAConfig:
    rank: int = 8
    dense: bool = False

    def __post_init__(self):
        if self.rank < 1:
            raise MethodOptionError(f"e3va: rank must be positive (8, 16 or 32 in the paper), got {self.rank}")


class DualLowRankLinear(nn.Module):
    """y = (s1 t1 + s2 t2) x + b with s_k (out x rank), t_k (rank x in)."""

    def __init__(self, in_features: int, out_features: int, rank: int, zero: bool = False):
        super().__init__()
        self.t = nn.ParameterList(nn.Parameter(torch.empty(rank, in_features)) for _ in range(2))
        self.s = nn.ParameterList(nn.Parameter(torch.empty(out_features, rank)) for _ in range(2))
        self.bias = nn.Parameter(torch.zeros(out_features))
        for t, s in zip(self.t, self.s):
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            if zero:
                nn.init.zeros_(s)
            else:
                nn.init.kaiming_uniform_(s, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # s1 t1 + s2 t2 = [s1 s2] [t1; t2]: one product of rank 2 alpha instead of two and a sum
        t, s = torch.cat(tuple(self.t)), torch.cat(tuple(self.s), dim=1)
        return F.linear(F.linear(x, t), s, self.bias)


class E3VAAdapter(nn.Module):
    """x + U(GELU(D(x))) on the channel axis (``channel_dim`` 1 for NCHW, -1 otherwise)."""

    def __init__(self, channels: int, rank: int, channel_dim: int = -1):
        super().__init__()
        middle = max(1, channels // 2)
        self.down = DualLowRankLinear(channels, middle, rank)
        self.up = DualLowRankLinear(middle, channels, rank, zero=True)
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.movedim(1, -1) if self.channel_dim == 1 else x
        if torch.is_grad_enabled() and self.up.bias.requires_grad:
            # Keep only the input for backward and recompute the (cheap, low-rank) branch there:
            # the highway's saved activations are then one tensor per adapter.
            h = h + checkpoint(self._branch, h, use_reentrant=False)
        else:
            h = h + self._branch(h)
        return h.movedim(-1, 1) if self.channel_dim == 1 else h

    def _branch(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(h)))


def _stage_norm(channels: int, layout: str) -> nn.Module:
    return LayerNorm2d(channels) if layout == "nchw" else nn.LayerNorm(channels)


class Highway(nn.Module):
    """The trainable side of E3VA: adapters per block branch, frozen downsample copies, stage norms."""

    def __init__(self, model: nn.Module, anatomy, rank: int, dense: bool):
        super().__init__()
        channel_dim = 1 if anatomy.layout == "nchw" else -1
        self.adapters = nn.ModuleList()
        self.passes = nn.ModuleDict()  # frozen copies the highway goes through
        for i, info in enumerate(anatomy.blocks):
            self.adapters.append(
                nn.ModuleList(E3VAAdapter(info.width, rank, channel_dim) for _ in info.branches)
                if info.has_skip else nn.ModuleList()
            )
            if not info.has_skip:
                self.passes[str(i)] = _frozen_copy(get_module(model, info.name))
        for stage in anatomy.stages:
            if stage.downsample:
                self.passes[f"down{stage.index}"] = _frozen_copy(get_module(model, stage.downsample))
        stage_norms = (_stage_norm(s.width, anatomy.layout) for s in anatomy.stages) if dense else ()
        self.stage_norms = nn.ModuleList(stage_norms)


def _frozen_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).requires_grad_(False)


class E3VAModel(BackboneWrapper):
    """The frozen ``backbone`` and its trainable ``highway``; the forward runs the highway (Sec. 3.2)."""

    normalizes_features = True  # feature_maps pass through the highway's trainable stage norms

    def __init__(self, backbone: nn.Module, anatomy, rank: int, dense: bool):
        super().__init__(backbone, anatomy)
        self.highway = Highway(backbone, anatomy, rank, dense)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Classification: the last stage of the highway through the backbone's (now trainable) final layers."""
        return self.family.head(self.backbone, self.stage_outputs(images)[-1])

    def stage_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Highway state at the end of every stage (before the stage norms), in the stream layout."""
        with torch.no_grad():
            l = self.family.embed(self.backbone, images)
        e, outputs = l.clone(), []
        for stage in self.anatomy.stages:
            if stage.downsample:
                with torch.no_grad():
                    l = self.backbone.get_submodule(stage.downsample)(l)
                e = _through_frozen(self.highway.passes[f"down{stage.index}"], e)
            for index in stage.blocks:
                l, e = self._block_step(index, l, e)
            outputs.append(e)
        return outputs

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale highway features as NCHW maps, one per stage after its trainable norm
        (like ``features_only``); token streams give their patch tokens (prefix dropped)."""
        if not len(self.highway.stage_norms):
            raise IncompatibleMethodError("multi-scale features need the stage norms: create the model with dense=true")
        feats = []
        for norm, e in zip(self.highway.stage_norms, self.stage_outputs(images)):
            f = norm(e)
            feats.append(to_nchw_map(f, self.family.grid(self.backbone, f, tuple(images.shape[-2:]))))
        return feats

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Dense heads read the highway, never the backbone (:meth:`features`)."""
        return self.features(images)

    def use_stages(self, stages: list[int]) -> None:
        """Stage norms of stages no head reads would train without a gradient: make them identities."""
        for index in range(len(self.highway.stage_norms)):
            if index not in stages:
                self.highway.stage_norms[index] = nn.Identity()

    def _block_step(self, index: int, l: torch.Tensor, e: torch.Tensor):
        """Run block ``index`` of the backbone without autograd and advance the highway."""
        info, block = self.anatomy.blocks[index], self.block(index)
        with torch.no_grad():
            if info.kind == "transformer":
                branches = self.family.branches(block)
                a = branches["attn"](l)
                l = l + a
                m = branches["mlp"](l)
                l, outputs = l + m, (a, m)
            else:
                out = block(l)
                outputs = (out - l,) if info.has_skip else ()
                l = out
        if info.has_skip:
            e = e + sum(adapter(o) for adapter, o in zip(self.highway.adapters[index], outputs))
        else:
            e = _through_frozen(self.highway.passes[str(index)], e)
        return l, e


def _through_frozen(module: nn.Module, e: torch.Tensor) -> torch.Tensor:
    """The highway through a frozen copy, keeping only ``e`` for backward (the copy reruns there)."""
    if torch.is_grad_enabled() and e.requires_grad:
        return checkpoint(module, e, use_reentrant=False)
    return module(e)


def e3va_stage_outputs(model: E3VAModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Alias of :meth:`E3VAModel.stage_outputs`."""
    return model.stage_outputs(x)


def e3va_features(model: E3VAModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Alias of :meth:`E3VAModel.features`."""
    return model.features(x)


@register_method(
    "e3va", E3VAConfig, "gradient highway of dual low-rank adapters beside the frozen backbone (E3VA)", owns="highway",
    backprops_backbone=False,
)
def apply_e3va(model: nn.Module, anatomy, config: E3VAConfig) -> E3VAModel:
    for name in anatomy.final:
        for module in get_module(model, name).modules():
            if isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
                unfreeze(module)
    return E3VAModel(model, anatomy, config.rank, config.dense)
