"""Moving stream tensors between their family layout and a channels-last token view."""

from __future__ import annotations

import torch

from ..anatomy.taps import Grid


def to_channels_last(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, ..., C) view of a stream: tokens and NHWC stay, NCHW is permuted."""
    return x.permute(0, 2, 3, 1) if grid.layout == "nchw" else x


def from_channels_last(x: torch.Tensor, grid: Grid) -> torch.Tensor:
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
