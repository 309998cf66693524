"""Tap points on a block's residual stream, for methods that add modules inside blocks.

``install_taps`` gives a block a ``dv_taps`` child (:class:`BlockTaps`) and a
forward that calls it at four places:

- ``before_block``: on the block input (VPT-deep replaces its prompts here);
- ``branch_out[name]``: applied to a residual branch's output before it is added
  back (Houlsby adapters sit here, after MSA and after the MLP);
- ``after_attn``: on the stream after the attention residual add, which is the
  stream the MLP branch reads (Mona's first adapter; transformers only);
- ``parallel[name]``: reads the stream entering a branch, its output is added
  beside the branch (AdaptFormer beside the MLP);
- ``after_block``: on the block output (Mona's second adapter).

Tap modules are called as ``module(x, grid)``: ``x`` in the family's stream
layout and ``grid`` a :class:`Grid` saying how to see it as an H x W map.
The block's own parameters keep their names, and an empty ``BlockTaps``
leaves the block's output unchanged.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

from .core import Anatomy


@dataclass(frozen=True)
class Grid:
    """How a stream tensor lies on the image grid.

    layout "tokens": (B, prefix + H*W, C); "nhwc": (B, H, W, C); "nchw": (B, C, H, W).
    """

    layout: str
    height: int
    width: int
    num_prefix_tokens: int = 0


class BlockTaps(nn.Module):
    def __init__(self):
        super().__init__()
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


def transformer_branches(block: nn.Module, family: str) -> dict:
    """The two residual branches of a ViT or Swin block as callables on the stream."""
    if family == "swin":
        return {
            "attn": lambda x: block.drop_path1(block._attn(block.norm1(x))),
            "mlp": lambda x: block.drop_path2(block.mlp(block.norm2(x))),
        }
    return {
        "attn": lambda x: block.drop_path1(block.ls1(block.attn(block.norm1(x)))),
        "mlp": lambda x: block.drop_path2(block.ls2(block.mlp(block.norm2(x)))),
    }


def _transformer_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    taps, grid = self.dv_taps, _transformer_grid(self, x)
    branches = transformer_branches(self, self.dv_family)
    x = taps.run_all(taps.before_block, x, grid)
    x = x + taps.run_branch_out("attn", branches["attn"](x), grid)
    x = taps.run_all(taps.after_attn, x, grid)
    side = taps.run_parallel("mlp", x, grid)
    x = x + taps.run_branch_out("mlp", branches["mlp"](x), grid)
    if side is not None:
        x = x + side
    return taps.run_all(taps.after_block, x, grid)


def _transformer_grid(block: nn.Module, x: torch.Tensor) -> Grid:
    if block.dv_family == "swin":
        return Grid("nhwc", x.shape[1], x.shape[2])
    return block.dv_grid_tracker()


def _conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A convolutional block's own forward, then its taps. Its single branch is
    recovered as output - input when the block has a skip, else the whole output."""
    taps = self.dv_taps
    x = taps.run_all(taps.before_block, x, _nchw_grid(x))
    out, grid = type(self).forward(self, x), _nchw_grid(x)
    if "main" in taps.branch_out:
        skip = x if _has_skip(self, x, out) else torch.zeros_like(out)
        out = skip + taps.run_branch_out("main", out - skip, grid)
    side = taps.run_parallel("main", x, grid)
    if side is not None:
        out = out + side
    return taps.run_all(taps.after_block, out, _nchw_grid(out))


def _has_skip(block: nn.Module, x: torch.Tensor, out: torch.Tensor) -> bool:
    return getattr(block, "has_skip", True) and x.shape == out.shape


def _nchw_grid(x: torch.Tensor) -> Grid:
    return Grid("nchw", x.shape[-2], x.shape[-1])


class GridTracker:
    """Remembers the patch grid of the last input, for token streams (ViT).

    The prefix count is read from the model at call time, so prompt tokens that
    a method adds (and counts into ``model.num_prefix_tokens``) are prefix too.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.patch_embed = model.patch_embed
        self.size = tuple(self.patch_embed.grid_size)
        self.patch_embed.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        height, width = args[0].shape[-2:]
        self.size = tuple(module.dynamic_feat_size((height, width)))

    def __call__(self) -> Grid:
        return Grid("tokens", self.size[0], self.size[1], self.model.num_prefix_tokens)


def install_taps(model: nn.Module, anatomy: Anatomy) -> list[BlockTaps]:
    """Give every block of ``model`` a BlockTaps (once) and return them in block order."""
    tracker = getattr(model, "dv_grid_tracker", None)
    if anatomy.family == "vit" and tracker is None:
        tracker = GridTracker(model)
        object.__setattr__(model, "dv_grid_tracker", tracker)  # plain attribute, not a submodule
    taps = []
    for info in anatomy.blocks:
        block = model.get_submodule(info.name)
        if not hasattr(block, "dv_taps"):
            block.dv_taps = BlockTaps()
            _bind_forward(block, anatomy, tracker)
        taps.append(block.dv_taps)
    return taps


def _bind_forward(block: nn.Module, anatomy: Anatomy, tracker) -> None:
    if anatomy.family in ("vit", "swin"):
        # plain attributes, not submodules or parameters
        object.__setattr__(block, "dv_family", anatomy.family)
        object.__setattr__(block, "dv_grid_tracker", tracker)
        block.forward = types.MethodType(_transformer_forward, block)
    else:
        block.forward = types.MethodType(_conv_forward, block)
