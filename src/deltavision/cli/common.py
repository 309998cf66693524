"""What every command shares: the typer app, the consoles, help texts and option parsing."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.console import Console


app = typer.Typer(
    help=(
        "Adapt pretrained vision backbones cheaply. Start with `deltavision compare`, which fine-tunes "
        "the embedded EfficientNet-Lite0 (real ImageNet weights) on Fashion-MNIST with every method."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[default: ...]" must show, not vanish as markup
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

BACKBONE_HELP = "timm model name, e.g. vit_base_patch16_224, swin_tiny_patch4_window7_224, tf_efficientnet_lite0."
OPT_HELP = "Method option as key=value (repeatable), e.g. --opt k=2 for partial; `deltavision methods` lists them."
LOW_MEMORY_HELP = (
    "CPU: hand freed activation blocks back to the system at once, so resident memory follows the live tensors "
    "(measured here: 28-53% less peak memory, 1.7-3x slower steps)."
)
DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."
PRECISION_HELP = "fp32, bf16 (autocast; works on CPUs too) or fp16 (autocast + gradient scaling; GPUs only)."
BACKBONE_OPT_HELP = "timm keyword argument as key=value (repeatable), e.g. --backbone-opt drop_path_rate=0.1."
CHECKPOINT_HELP = "Local backbone weights (.safetensors/.pth) instead of the hub; needed offline."
DATA_HELP = (
    "An image folder (train/ and val/ subfolders, or class folders to split) or fashion-mnist, mnist5k, digits. "
    "Segmentation: fashion-scenes (offline composites of real images) or a Pascal VOC, ADE20K or images/ + masks/ "
    "folder."
)
TASK_HELP = "classification, or segmentation (per-pixel classes; a UPerNet or FPN head over the backbone's stages)."
HEAD_HELP = "Segmentation head: upernet (default) or fpn (lighter)."
LOGGER_DEFAULT = "auto"
LOGGER_HELP = (
    "Besides log.csv: tensorboard (event files in the run folder; auto picks it when tensorboard is installed), "
    "wandb (Weights & Biases, pip install wandb) or csv (nothing more)."
)


def _options(pairs: Optional[List[str]]) -> dict:
    from ..options import parse_pairs

    return parse_pairs(pairs)


def _backbone_options(pairs: Optional[List[str]]) -> dict:
    from ..options import backbone_options

    return backbone_options(pairs)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` on the command line (not its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

