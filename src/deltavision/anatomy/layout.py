"""The one home for stream layouts: how a tensor between blocks lies on the image grid.

A stream is in one of three layouts: "tokens" (B, prefix + H*W, C), "nhwc"
(B, H, W, C) or "nchw" (B, C, H, W). A :class:`Grid` records which, with the
H x W patch grid and the number of prefix tokens (class, register or prompt
tokens) before it. Every conversion a method or the gatherer needs is here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("tokens", "nhwc", "nchw")


@dataclass(frozen=True)
class Grid:
    """How a stream tensor lies on the image grid."""

    layout: str
    height: int
    width: int
    num_prefix_tokens: int = 0


def grid_of(stream: torch.Tensor, layout: str, patch_grid: tuple[int, int] | None = None) -> Grid:
    """The grid of ``stream``; token streams need their ``patch_grid``, the rest is counted as prefix."""
    if layout == "nhwc":
        return Grid(layout, stream.shape[1], stream.shape[2])
    if layout == "nchw":
        return Grid(layout, stream.shape[2], stream.shape[3])
    height, width = patch_grid
    return Grid(layout, height, width, stream.shape[1] - height * width)


def to_channels_last(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, ..., C) view of a stream: tokens and NHWC stay, NCHW is permuted."""
    return x.permute(0, 2, 3, 1) if grid.layout == "nchw" else x


def from_channels_last(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Inverse of :func:`to_channels_last`."""
    return x.permute(0, 3, 1, 2) if grid.layout == "nchw" else x


def split_tokens(x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Channels-last stream -> (prefix tokens or None, patch map B x C x H x W)."""
    if grid.layout == "tokens":
        prefix, patches = x[:, : grid.num_prefix_tokens], x[:, grid.num_prefix_tokens :]
        patch_map = patches.transpose(1, 2).reshape(x.shape[0], x.shape[-1], grid.height, grid.width)
        return (prefix if grid.num_prefix_tokens else None), patch_map
    return None, x.permute(0, 3, 1, 2)


def join_tokens(prefix: torch.Tensor | None, patch_map: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Inverse of :func:`split_tokens`."""
    if grid.layout == "tokens":
        patches = patch_map.flatten(2).transpose(1, 2)
        return patches if prefix is None else torch.cat([prefix, patches], dim=1)
    return patch_map.permute(0, 2, 3, 1)


def to_tokens(stream: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, T, C) view of a stream: tokens as they are, maps flattened row-major into H*W tokens."""
    if layout == "tokens":
        return stream
    if layout == "nhwc":
        return stream.flatten(1, 2)
    return stream.flatten(2).transpose(1, 2)


def to_nchw_map(stream: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, C, H, W) map of a stream's patches; prefix tokens are dropped."""
    return split_tokens(to_channels_last(stream, grid), grid)[1]
