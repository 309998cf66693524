"""One training run from a declarative config: settings resolved once, model, data, loop, saved adapter.

:func:`resolve_run` settles every default (the method's learning rate, the
backbone's input size and normalisation, typed method options) in one place,
so the CLI, ``compare`` and ``run_training`` train identically. The resolved
settings are written to ``run.json`` in the run folder before training; a
resumed run and ``deltavision eval`` read them back, so they see exactly the
run's data split and training settings.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..defaults import VERSION as __version__
from ..errors import ArtifactExistsError, DeltaVisionError
from ..io import ensure_writable_dir, load_json, save_json
from ..memory import peak_rss_bytes
from ..methods import get_method, make_config
from ..options import config_options
from ..tasks.registry import get_task
from .device import check_precision, resolve_device
from .distributed import setup
from .loop import CHECKPOINT, TrainConfig, train
from .objectives import objective_for

ADAPTER_DIR = "adapter"
RUN_FILE = "run.json"
# The default learning rate of a dense run at most. The heads are millions of fresh weights: torchvision's
# detectors diverge under AdamW at the 1e-2 that suits the small adapters of SSF or E3VA alone, and on
# fashion-scenes segmentation E3VA/LoRA reached 17.6/16.9 mIoU at 1e-3 against 11.2/12.5 at 1e-2
# (benchmarks/results/segmentation.md).
DENSE_MAX_LR = 1e-3
# Settings that do not change what a run computes, so a resume may differ in them.
FREE_ON_RESUME = (
    "resume", "overwrite", "out_dir", "progress", "device", "workers", "channels_last", "grad_checkpointing", "compile",
    "low_memory", "logger",
)


class RunConflictError(DeltaVisionError):
    """A resumed run was asked for settings other than the ones it started with."""


class RecipeError(DeltaVisionError, ValueError):
    """A training-recipe setting that cannot apply: an unknown augmentation policy, mixup for segmentation..."""


@dataclass
class RunConfig:
    backbone: str
    method: str
    data: str
    out_dir: str
    options: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"
    head: str | None = None  # dense tasks: the head ("upernet" by default for segmentation)
    data_options: dict[str, Any] = field(default_factory=dict)  # see deltavision.data.build_datasets
    image_size: int | None = None
    val_fraction: float = 0.2
    train_limit: int | None = None
    val_limit: int | None = None
    pretrained: bool = True
    checkpoint: str | None = None
    backbone_options: dict[str, Any] = field(default_factory=dict)
    augment: bool = True
    auto_augment: str | None = None  # timm's policy, e.g. "rand-m9-mstd0.5-inc1" (classification, with augment)
    reprob: float = 0.0  # random erasing probability (classification, with augment)
    color_jitter: float = 0.0
    resume: bool = False
    overwrite: bool = False
    channels_last: bool = False
    grad_checkpointing: bool = False
    compile: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)


def resolve_run(config: RunConfig) -> RunConfig:
    """``config`` with every default settled: learning rate, typed options, input size, normalisation.

    Fails on an unknown method, backbone or option before any data or weights load.
    """
    spec = get_method(config.method)
    options = config_options(make_config(spec, config.options))
    image_size = config.image_size or data_settings(config.backbone, config.backbone_options)["image_size"]
    from ..model.build import resolve_head

    head = resolve_head(config.task, config.head)
    lr = config.train.lr if config.train.lr is not None else spec.default_lr
    if config.train.lr is None and get_task(config.task).dense:
        lr = min(lr, DENSE_MAX_LR)
    _check_recipe(config)
    return replace(
        config, options=options, image_size=image_size, head=head, backbone_options=dict(config.backbone_options or {}),
        train=replace(config.train, lr=lr),
    )


def _check_recipe(config: RunConfig) -> None:
    """Refuse recipe settings that cannot apply, before any data or weights load."""
    from .loggers import resolve_logger

    resolve_logger(config.train.logger)
    train = config.train
    mixing = train.mixup > 0 or train.cutmix > 0
    if get_task(config.task).dense:
        asked = [flag for flag, value in (("--mixup", train.mixup), ("--cutmix", train.cutmix),
                                          ("--auto-augment", config.auto_augment), ("--reprob", config.reprob),
                                          ("--color-jitter", config.color_jitter)) if value]
        if asked:
            raise RecipeError(f"{', '.join(asked)} apply to classification only, not to {config.task}")
    if mixing and train.batch_size % 2:
        raise RecipeError(f"mixup/cutmix pair the images of a batch: --batch-size must be even, not {train.batch_size}")
    if config.auto_augment:
        _check_auto_augment(config.auto_augment)


def _check_auto_augment(policy: str) -> None:
    """Build timm's transform for ``policy`` once, so a typo fails here with one clear message."""
    from ..data.transforms import Augmentation, make_transforms

    try:
        make_transforms(8, 0.5, 0.5, augment=True, augmentation=Augmentation(auto_augment=policy))
    except Exception as err:  # timm raises assertion, value or key errors for unknown policies
        raise RecipeError(
            f"--auto-augment {policy!r} is not a timm policy ({err or type(err).__name__}); "
            "e.g. rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2, original, v0"
        ) from None


def data_settings(backbone: str, backbone_options: dict[str, Any] | None, image_size: int | None = None) -> dict:
    """Input size, normalisation, interpolation and evaluation crop from the backbone's pretrained config
    (no weights needed)."""
    import timm
    from timm.data import resolve_data_config

    from ..backbones import check_backbone_name

    check_backbone_name(backbone)
    probe = timm.create_model(backbone, pretrained=False, num_classes=0, **(backbone_options or {}))
    resolved = resolve_data_config(model=probe)
    size = image_size or resolved["input_size"][-1]
    return {"image_size": size, "mean": list(resolved["mean"]), "std": list(resolved["std"]),
            "interpolation": resolved["interpolation"], "crop_pct": resolved["crop_pct"]}


def settings_json(config: RunConfig) -> dict[str, Any]:
    """The resolved settings as JSON (what run.json and the adapter config record)."""
    return json.loads(json.dumps(asdict(config)))


def config_from_settings(settings: dict[str, Any]) -> RunConfig:
    """Inverse of :func:`settings_json`."""
    known = {f.name for f in fields(RunConfig)}
    values = {k: v for k, v in settings.items() if k in known}
    values["train"] = TrainConfig(**{k: v for k, v in settings.get("train", {}).items()
                                     if k in {f.name for f in fields(TrainConfig)}})
    return RunConfig(**values)


def read_run_settings(out_dir: str | Path) -> dict[str, Any]:
    """The resolved settings a run folder was started with."""
    return load_json(Path(out_dir) / RUN_FILE)["settings"]


def check_resume(config: RunConfig, saved: dict[str, Any]) -> None:
    """Refuse to resume a run with settings other than its own, naming each difference."""
    ours, diffs = settings_json(config), []
    for key, value in saved.items():
        if key == "train":
            diffs += [(f"train.{k}", v, ours["train"].get(k)) for k, v in value.items()
                      if k not in FREE_ON_RESUME and ours["train"].get(k) != v]
        elif key not in FREE_ON_RESUME and ours.get(key) != value:
            diffs.append((key, value, ours.get(key)))
    if diffs:
        listed = "; ".join(f"{k}: the run has {saved_v!r}, asked {ours_v!r}" for k, saved_v, ours_v in diffs)
        raise RunConflictError(
            f"cannot resume {config.out_dir} with other settings ({listed}); drop those flags to resume "
            "with the run's own settings, or start a new run with --overwrite"
        )


def run_training(config: RunConfig) -> dict[str, Any]:
    """Train as configured; return a summary with parameters, accuracy, time and peak memory."""
    from ..model import count_parameters, create_model, save_adapter

    out_dir = Path(config.out_dir)
    _check_output_free(out_dir, config)
    config = resolve_run(config)
    if config.resume and (out_dir / RUN_FILE).exists():
        check_resume(config, read_run_settings(out_dir))
    data_cfg = data_settings(config.backbone, config.backbone_options, config.image_size)
    splits = build_task_datasets(config, data_cfg)
    if config.train.progress and int(os.environ.get("RANK", 0)) == 0:
        print(data_line(splits, config.data), flush=True)
    torch.manual_seed(config.train.seed)  # the same seed rebuilds the same head, adapter and random backbone
    model = create_model(
        config.backbone, config.method, len(splits.classes), pretrained=config.pretrained,
        checkpoint=config.checkpoint, backbone_options=config.backbone_options or None, task=config.task,
        head=config.head, head_options=detector_options(config), **config.options,
    )
    device = resolve_device(config.train.device)
    check_precision(device, config.train.precision)
    world = setup(device)
    net = prepare_model(model, config)
    if world.is_main:
        ensure_writable_dir(out_dir)
        _write_run_file(out_dir, config, data_cfg, device, world)
    rss_before = peak_rss_bytes()
    objective = objective_for(config.task, splits.classes)
    result = train(net, splits.train, splits.val, config.train, out_dir, resume=config.resume, objective=objective)
    extra = {"classes": splits.classes, "data": data_cfg, "source": config.data, "seed": config.train.seed,
             "run": settings_json(config)}
    if world.is_main:
        save_adapter(model.cpu(), out_dir / ADAPTER_DIR, extra=extra)
    return {
        "backbone": config.backbone,
        "method": config.method,
        **count_parameters(model),
        "task": config.task,
        **{k: result.final.get(k) for k in (*objective.plotted, "val_loss", "train_loss")},
        "train_seconds": result.train_seconds,
        "peak_memory_mb": max(0, peak_rss_bytes() - rss_before) / 2**20,
        "epochs": len(result.history),
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "num_classes": len(splits.classes),
        "out_dir": str(out_dir),
        "config": asdict(config),
    }


def build_task_datasets(config: RunConfig, data_cfg: dict):
    """The run's train and validation splits for its task."""
    from ..data import Augmentation

    return datasets_for_task(
        config.task, config.data, data_cfg, val_fraction=config.val_fraction, train_limit=config.train_limit,
        val_limit=config.val_limit, augment=config.augment, seed=config.train.seed, data_options=config.data_options,
        augmentation=Augmentation(config.auto_augment, config.reprob, config.color_jitter),
    )


def datasets_for_task(task: str, source: str, data_cfg: dict, *, data_options=None, augmentation=None, **common):
    """Train and validation splits of ``source`` for ``task``, at the input size and normalisation of
    ``data_cfg``; classification also takes the run's data options, augmentation and evaluation crop."""
    from ..data import build_datasets
    from ..data.detection import build_detection_datasets
    from ..data.segmentation import build_segmentation_datasets

    entry = get_task(task)
    common.update(image_size=data_cfg["image_size"], mean=data_cfg["mean"], std=data_cfg["std"])
    if entry.segments:  # torchvision's joint image-and-mask transforms
        return build_segmentation_datasets(source, **common)
    if entry.detects:
        return build_detection_datasets(source, masks=entry.masks, **common)
    extra = {"augmentation": augmentation} if augmentation is not None else {}
    return build_datasets(source, data_options=data_options, **common, **eval_transform_settings(data_cfg), **extra)


def detector_options(config: RunConfig) -> dict | None:
    """Detectors resize every image to the run's input size (not torchvision's 800 px)."""
    return {"image_size": config.image_size} if get_task(config.task).detects else None


def eval_transform_settings(data_cfg: dict) -> dict:
    """The interpolation and evaluation crop a run used (runs recorded before they were: bilinear, no crop)."""
    return {"interpolation": data_cfg.get("interpolation", "bilinear"), "crop_pct": data_cfg.get("crop_pct", 1.0)}


def data_line(splits, source: str) -> str:
    """What the data holds, e.g. "data: 1000 training / 500 validation images, 10 classes (fashion-mnist)"."""
    return (
        f"data: {len(splits.train)} training / {len(splits.val)} validation images, "
        f"{len(splits.classes)} classes ({source})"
    )


def prepare_model(model: torch.nn.Module, config: RunConfig) -> torch.nn.Module:
    """Channels-last memory, timm's gradient checkpointing and torch.compile, as asked.

    Gradient checkpointing recomputes the backbone's activations for its
    gradients; a method that never backpropagates through the backbone (E3VA,
    linear probing) has none to save, so asking for it there is refused.
    """
    spec = get_method(config.method)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.grad_checkpointing:
        if not spec.backprops_backbone:
            raise RunConflictError(
                f"--grad-checkpointing saves memory of the backbone's backward pass, which {config.method} "
                "never runs; drop the flag"
            )
        from ..model.build import adapted_backbone

        backbone = adapted_backbone(model)
        backbone = getattr(backbone, "backbone", backbone)  # a method wrapper's timm model
        if not hasattr(backbone, "set_grad_checkpointing"):
            raise RunConflictError(f"{config.backbone} does not support gradient checkpointing in timm")
        backbone.set_grad_checkpointing(True)
    return torch.compile(model) if config.compile else model


def _write_run_file(out_dir: Path, config: RunConfig, data_cfg: dict, device: torch.device, world) -> None:
    """run.json: versions, where and how the run ran, and every resolved setting."""
    import timm

    versions = {"deltavision": __version__, "torch": torch.__version__, "timm": timm.__version__,
                "python": platform.python_version()}
    train_cfg = config.train
    how = {"device": str(device), "precision": train_cfg.precision, "world_size": world.size,
           "batch_per_device": train_cfg.batch_size, "grad_accum": train_cfg.grad_accum,
           "global_batch": train_cfg.batch_size * world.size * train_cfg.grad_accum}
    save_json({"versions": versions, "run": how, "settings": settings_json(config), "data": data_cfg},
              out_dir / RUN_FILE)


def _check_output_free(out_dir: Path, config: RunConfig) -> None:
    if config.overwrite or config.resume:
        return
    for name in (ADAPTER_DIR, CHECKPOINT):
        if (out_dir / name).exists():
            raise ArtifactExistsError(
                f"{out_dir / name} already exists; use --resume to continue that run or --overwrite to start over"
            )
