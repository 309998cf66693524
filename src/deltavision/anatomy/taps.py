"""Tap points on a block's residual stream, for methods that add modules inside blocks.

``install_taps`` gives a block a ``dv_taps`` child (:class:`BlockTaps`) and a
forward (the Family's ``tapped_forward``) that calls it at these places:

- ``before_block``: on the block input;
- ``branch_out[name]``: applied to a residual branch's output before it is added
  back (Houlsby adapters sit here, after MSA and after the MLP);
- ``after_attn``: on the stream after the attention residual add, which is the
  stream the MLP branch reads (Mona's first adapter; transformers only);
- ``parallel[name]``: reads the stream entering a branch, its output is added
  beside the branch (AdaptFormer beside the MLP);
- ``after_block``: on the block output (Mona's second adapter).

Tap modules are called as ``module(x, grid)``: ``x`` in the family's stream
layout and ``grid`` a :class:`~.layout.Grid` saying how to see it as an H x W map.
The block's own parameters keep their names, and an empty ``BlockTaps``
leaves the block's output unchanged.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from .core import Anatomy
from .family import Family, get_family
from .layout import Grid


class BlockTaps(nn.Module):
    """The tap modules of one block, the Family that runs the block and its stream's grid."""

    def __init__(self, family: Family, grid: Callable[[torch.Tensor], Grid]):
        super().__init__()
        self.family = family
        self.grid = grid
        self.before_block = nn.ModuleList()
        self.branch_out = nn.ModuleDict()
        self.after_attn = nn.ModuleList()
        self.parallel = nn.ModuleDict()
        self.after_block = nn.ModuleList()

    def run_branch_out(self, name: str, y: torch.Tensor, grid: Grid) -> torch.Tensor:
        return self.branch_out[name](y, grid) if name in self.branch_out else y

    def run_parallel(self, name: str, x: torch.Tensor, grid: Grid):
        return self.parallel[name](x, grid) if name in self.parallel else None

    @staticmethod
    def run_all(modules: nn.ModuleList, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        for module in modules:
            x = module(x, grid)
        return x

    def is_empty(self) -> bool:
        return not (len(self.before_block) or len(self.branch_out) or len(self.after_attn) or len(self.parallel) or len(self.after_block))


def _tapped_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return self.dv_taps.family.tapped_forward(self, self.dv_taps, x)


def install_taps(model: nn.Module, anatomy: Anatomy) -> list[BlockTaps]:
    """Give every block of ``model`` a BlockTaps (once) and return them in block order."""
    family = get_family(anatomy.family)
    grid = None
    taps = []
    for info in anatomy.blocks:
        block = model.get_submodule(info.name)
        if not hasattr(block, "dv_taps"):
            grid = grid or family.grid_tracker(model)
            block.dv_taps = BlockTaps(family, grid)
            block.forward = types.MethodType(_tapped_forward, block)
        taps.append(block.dv_taps)
    return taps
