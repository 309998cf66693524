"""LoRA: low-rank adaptation (Hu et al., ICLR 2022, Sec. 4.1, Eq. 3).

A frozen weight W gains a trainable low-rank update: h = W x + (alpha / r) B A x,
A (r x in) Kaiming-uniform, B (out x r) zero, so training starts from the
backbone. By default the update touches the query and value rows of every
block's fused qkv projection (Sec. 7.1: W_q and W_v); ``targets`` may also
name block-relative Linear or 1x1-convolution layers ("proj", "fc1", "k", ...).
Blocks without attention take their family's defaults
(``Family.lora_targets``), a choice of ours documented with each family: the
MLP's fc1 and fc2 on ConvNeXt, the point-wise convolutions elsewhere. A
family without defaults asks for ``targets``.
``merge`` adds (alpha / r) B A into W exactly, leaving the plain architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy import get_family
from ..errors import IncompatibleMethodError, MethodOptionError
from .common import set_module
from .registry import register_method

QKV_SLICES = ("q", "k", "v")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 8.0
    targets: tuple = ()  # empty: the family's default (Family.lora_targets)

    def __post_init__(self):
        if self.rank < 1:
            raise MethodOptionError(f"lora: rank must be positive, got {self.rank}")
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)


class LoRALinear(nn.Module):
    """``base`` (frozen Linear) plus low-rank updates on chosen row slices of its output."""

    def __init__(self, base: nn.Linear, slices: dict[str, slice], rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.slices = dict(slices)
        self.scaling = alpha / rank
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        for name, rows in self.slices.items():
            a = torch.empty(rank, base.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_a[name] = nn.Parameter(a)
            self.lora_b[name] = nn.Parameter(torch.zeros(rows.stop - rows.start, rank))

    def delta_weight(self) -> torch.Tensor:
        delta = torch.zeros_like(self.base.weight)
        for name, rows in self.slices.items():
            delta[rows] = self.scaling * (self.lora_b[name] @ self.lora_a[name])
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for name, rows in self.slices.items():
            # added into the rows in place: no full-width zero delta is built (the base's output is not
            # needed for its own backward, so autograd allows it)
            out[..., rows].add_(F.linear(F.linear(x, self.lora_a[name]), self.lora_b[name]), alpha=self.scaling)
        return out


class LoRAConv1x1(nn.Module):
    """``base`` (frozen 1x1 convolution) plus a low-rank update of its channel mixing."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        a = torch.empty(rank, base.in_channels)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(torch.zeros(base.out_channels, rank))

    def delta_weight(self) -> torch.Tensor:
        return (self.scaling * self.lora_b @ self.lora_a)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = F.conv2d(F.conv2d(x, self.lora_a[:, :, None, None]), self.lora_b[:, :, None, None])
        return self.base(x) + self.scaling * low_rank


def _is_pointwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
        and module.stride == (1, 1) and module.padding in ((0, 0), "valid")
    )


def _wrap(module: nn.Module, slices, config) -> nn.Module:
    if isinstance(module, nn.Linear):
        return LoRALinear(module, slices, config.rank, config.alpha)
    return LoRAConv1x1(module, config.rank, config.alpha)


def _targets_in_block(block: nn.Module, targets: tuple[str, ...]) -> tuple[dict[str, dict[str, slice]], set[str]]:
    """({block-relative layer name: {slice name: output rows}}, the targets that matched here)."""
    found: dict[str, dict[str, slice]] = {}
    matched: set[str] = set()
    qkv_parts = [t for t in targets if t in QKV_SLICES]
    if qkv_parts:
        qkv = _find_qkv(block)
        if qkv is None:
            raise IncompatibleMethodError(
                f"lora: target(s) {', '.join(qkv_parts)} need a fused qkv projection, which {type(block).__name__} "
                "blocks lack; name Linear layers instead, e.g. --opt targets=fc1,fc2"
            )
        name, linear = qkv
        third = linear.out_features // 3
        found[name] = {t: slice(i * third, (i + 1) * third) for i, t in enumerate(QKV_SLICES) if t in qkv_parts}
        matched.update(qkv_parts)
    modules = dict(block.named_modules())
    for target in (t for t in targets if t not in QKV_SLICES):
        for name, module in modules.items():
            if (isinstance(module, nn.Linear) or _is_pointwise(module)) and (name == target or name.endswith("." + target)):
                found[name] = {"all": slice(0, getattr(module, "out_features", 0))}
                matched.add(target)
    return found, matched


def _find_qkv(block: nn.Module):
    for name, module in block.named_modules():
        if name.endswith("qkv") and isinstance(module, nn.Linear):
            return name, module
    return None


def _merge_lora(model: nn.Module, anatomy) -> None:
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAConv1x1))]
    for name, module in wrapped:
        with torch.no_grad():
            module.base.weight.add_(module.delta_weight())
        set_module(model, name, module.base)


@register_method("lora", LoRAConfig, "low-rank updates of q and v (LoRA); merges into the weights", merge=_merge_lora, owns="lora_")
def apply_lora(model: nn.Module, anatomy, config: LoRAConfig) -> None:
    targets = config.targets or get_family(anatomy.family).lora_targets(model)
    if not targets:
        raise MethodOptionError(
            f"lora: {anatomy.family} backbones like this one have no default LoRA targets; "
            "name Linear or 1x1 convolution layers of the blocks with --opt targets=..."
        )
    plan, matched = [], set()
    for info in anatomy.blocks:
        block = model.get_submodule(info.name)
        found, hits = _targets_in_block(block, targets)
        plan.append((block, found))
        matched |= hits
    unmatched = [t for t in targets if t not in matched]
    if unmatched:
        raise MethodOptionError(
            f"lora: no Linear or 1x1 convolution named {', '.join(map(repr, unmatched))} in the blocks of this backbone"
        )
    for block, found in plan:
        for rel, slices in found.items():
            set_module(block, rel, _wrap(block.get_submodule(rel), slices, config))
