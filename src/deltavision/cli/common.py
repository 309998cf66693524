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
ADAPTER_HELP = (
    "Adapter folder written by `deltavision train` (e.g. runs/flowers/adapter), or a Hugging Face Hub id "
    "hf-hub:org/name[@revision] (downloaded once into the hub cache; offline, the cached copy is used)."
)
DATA_HELP = (
    "An image folder (train/ and val/ subfolders, or class folders to split); fashion-mnist, mnist5k, digits; "
    "hf:NAME[:CONFIG] (Hugging Face datasets; also a save_to_disk folder or a .parquet file); "
    "torchvision:NAME (with --data-root); or vtab:ROOT/TASK (a VTAB-1k task folder; add :tune for train800/val200). "
    "Segmentation: fashion-scenes (offline composites of real images) or a Pascal VOC, ADE20K or images/ + masks/ "
    "folder."
)
TASK_HELP = (
    "classification; segmentation (per-pixel classes; a UPerNet or FPN head over the backbone's stages); "
    "detection (boxes); or instance (boxes and masks, Mask R-CNN)."
)
HEAD_HELP = (
    "Segmentation head: upernet (default) or fpn (lighter). Detection: fasterrcnn (default) or retinanet; "
    "instance: maskrcnn."
)
IMAGE_COLUMN_HELP = "hf: data: the image column [default: the one of feature type Image]."
LABEL_COLUMN_HELP = "hf: data: the label column [default: the one of feature type ClassLabel]."
DATA_ROOT_HELP = "torchvision: data: the folder the dataset is kept in."
DOWNLOAD_HELP = "torchvision: data: download the dataset into --data-root if it is not there."
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


def _data_options(image_column: Optional[str], label_column: Optional[str], data_root, download: bool) -> dict:
    """The data options the user gave (see deltavision.data.build_datasets), unset ones left out."""
    given = {"image_column": image_column, "label_column": label_column,
             "data_root": str(data_root) if data_root else None, "download": download or None}
    return {key: value for key, value in given.items() if value is not None}


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` on the command line (not its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

