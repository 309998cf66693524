"""Small readers of timm structure that several families share."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..core import Block, Stage


def present(module: nn.Module, names) -> tuple[str, ...]:
    return tuple(n for n in names if hasattr(module, n))


def classifier_name(model: nn.Module) -> str:
    return model.pretrained_cfg.get("classifier", "head")


def staged_blocks(model: nn.Module, stages_attr: str, kind: Callable[[nn.Module], str]) -> tuple[tuple, tuple]:
    """(blocks, stages) of a model whose stages each hold ``downsample`` and ``blocks``."""
    blocks, stages = [], []
    for s, stage in enumerate(getattr(model, stages_attr)):
        width, first = model.feature_info[s]["num_chs"], len(blocks)
        for j, block in enumerate(stage.blocks):
            blocks.append(Block(f"{stages_attr}.{s}.blocks.{j}", s, kind(block), width))
        downsample = None if isinstance(stage.downsample, nn.Identity) else f"{stages_attr}.{s}.downsample"
        stages.append(Stage(s, downsample, tuple(range(first, len(blocks))), width))
    return tuple(blocks), tuple(stages)
