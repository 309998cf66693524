"""One training run from a declarative config: model, data, loop, saved adapter."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.data import resolve_data_config

from ..data import build_datasets
from ..errors import ArtifactExistsError
from ..methods import get_method, make_config
from ..model import count_parameters, create_model, save_adapter
from .loop import CHECKPOINT, TrainConfig, train

ADAPTER_DIR = "adapter"


@dataclass
class RunConfig:
    backbone: str
    method: str
    data: str
    out_dir: str
    options: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    val_fraction: float = 0.2
    train_limit: int | None = None
    val_limit: int | None = None
    pretrained: bool = True
    checkpoint: str | None = None
    backbone_options: dict[str, Any] = field(default_factory=dict)
    augment: bool = True
    resume: bool = False
    overwrite: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: VmHWM from /proc, which starts afresh in every new program. Not
    ru_maxrss: a child process inherits its parent's peak there, so a fresh
    worker started from a large parent would report the parent's memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_training(config: RunConfig) -> dict[str, Any]:
    """Train as configured; return a summary with parameters, accuracy, time and peak memory."""
    out_dir = Path(config.out_dir)
    _check_output_free(out_dir, config)
    make_config(get_method(config.method), config.options)  # bad method or option: fail before loading data
    data_cfg = _data_config(config)
    splits = build_datasets(
        config.data,
        image_size=data_cfg["image_size"],
        mean=data_cfg["mean"],
        std=data_cfg["std"],
        val_fraction=config.val_fraction,
        train_limit=config.train_limit,
        val_limit=config.val_limit,
        augment=config.augment,
        seed=config.train.seed,
    )
    if config.train.progress:
        print(data_line(splits, config.data), flush=True)
    torch.manual_seed(config.train.seed)  # the same seed rebuilds the same head, adapter and random backbone
    model = create_model(
        config.backbone, config.method, len(splits.classes), pretrained=config.pretrained,
        checkpoint=config.checkpoint, backbone_options=config.backbone_options or None, **config.options,
    )
    rss_before = peak_rss_bytes()
    result = train(model, splits.train, splits.val, config.train, out_dir, resume=config.resume)
    extra = {"classes": splits.classes, "data": data_cfg, "source": config.data, "seed": config.train.seed}
    save_adapter(model, out_dir / ADAPTER_DIR, extra=extra)
    return {
        "backbone": config.backbone,
        "method": config.method,
        **count_parameters(model),
        **{k: result.final.get(k) for k in ("top1", "top5", "val_loss", "train_loss")},
        "train_seconds": result.train_seconds,
        "peak_memory_mb": max(0, peak_rss_bytes() - rss_before) / 2**20,
        "epochs": len(result.history),
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "num_classes": len(splits.classes),
        "out_dir": str(out_dir),
        "config": asdict(config),
    }


def data_line(splits, source: str) -> str:
    """What the data holds, e.g. "data: 1000 training / 500 validation images, 10 classes (fashion-mnist)"."""
    return (
        f"data: {len(splits.train)} training / {len(splits.val)} validation images, "
        f"{len(splits.classes)} classes ({source})"
    )


def _data_config(config: RunConfig) -> dict[str, Any]:
    """Input size and normalisation from the backbone's pretrained config (no weights needed)."""
    import timm

    from ..backbones import check_backbone_name

    check_backbone_name(config.backbone)
    probe = timm.create_model(config.backbone, pretrained=False, num_classes=0, **(config.backbone_options or {}))
    resolved = resolve_data_config(model=probe)
    size = config.image_size or resolved["input_size"][-1]
    return {"image_size": size, "mean": list(resolved["mean"]), "std": list(resolved["std"])}


def _check_output_free(out_dir: Path, config: RunConfig) -> None:
    if config.overwrite or config.resume:
        return
    for name in (ADAPTER_DIR, CHECKPOINT):
        if (out_dir / name).exists():
            raise ArtifactExistsError(
                f"{out_dir / name} already exists; use --resume to continue that run or --overwrite to start over"
            )
