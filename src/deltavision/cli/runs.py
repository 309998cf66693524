"""Commands that train: train (and resume), plan, compare."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..defaults import EMBEDDED_BACKBONE, EMBEDDED_DATA
from .common import (
    BACKBONE_HELP, BACKBONE_OPT_HELP, CHECKPOINT_HELP, DATA_HELP, DATA_ROOT_HELP, DEVICE_HELP, DOWNLOAD_HELP,
    HEAD_HELP, IMAGE_COLUMN_HELP, LABEL_COLUMN_HELP, LOGGER_DEFAULT, LOGGER_HELP, LOW_MEMORY_HELP, OPT_HELP,
    PRECISION_HELP, TASK_HELP, _backbone_options, _data_options, _given, _options, app, console, err_console,
)

@app.command()
def train(
    ctx: typer.Context,
    data: Optional[str] = typer.Option(None, help=DATA_HELP + " Required unless --resume."),
    image_column: Optional[str] = typer.Option(None, help=IMAGE_COLUMN_HELP),
    label_column: Optional[str] = typer.Option(None, help=LABEL_COLUMN_HELP),
    data_root: Optional[Path] = typer.Option(None, help=DATA_ROOT_HELP),
    download: bool = typer.Option(False, "--download", help=DOWNLOAD_HELP),
    backbone: str = typer.Option(EMBEDDED_BACKBONE, help=BACKBONE_HELP),
    method: str = typer.Option("ssf", help="Tuning method (see `deltavision methods`)."),
    task: str = typer.Option("classification", help=TASK_HELP),
    head: Optional[str] = typer.Option(None, help=HEAD_HELP),
    opt: Optional[List[str]] = typer.Option(None, help=OPT_HELP),
    backbone_opt: Optional[List[str]] = typer.Option(None, help=BACKBONE_OPT_HELP),
    out: Path = typer.Option(Path("runs/train"), help="Run folder: log.csv, curves.png, checkpoint, adapter/."),
    epochs: int = typer.Option(3, min=1),
    batch_size: int = typer.Option(32, min=1),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate [default: the method's]."),
    weight_decay: float = typer.Option(0.05, min=0.0),
    warmup_epochs: float = typer.Option(0.5, min=0.0),
    warmup_lr: float = typer.Option(1e-6, min=0.0, help="Learning rate of the first update; linear warm-up to --lr."),
    min_lr: float = typer.Option(0.0, min=0.0, help="Learning rate the cosine reaches at the last update."),
    label_smoothing: float = typer.Option(0.1, min=0.0, max=0.99),
    mixup: float = typer.Option(0.0, min=0.0, help="Mixup alpha (timm's Mixup, soft-target loss; 0: off). SSF: 0.8."),
    cutmix: float = typer.Option(0.0, min=0.0, help="CutMix alpha (0: off; with --mixup, each batch picks one). SSF: 1.0."),
    auto_augment: Optional[str] = typer.Option(
        None, help="timm augmentation policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment, SSF's) [default: none]."
    ),
    reprob: float = typer.Option(0.0, min=0.0, max=1.0, help="Random erasing probability (SSF: 0.25)."),
    color_jitter: float = typer.Option(0.0, min=0.0, help="Colour jitter strength (off under --auto-augment)."),
    logger: str = typer.Option(LOGGER_DEFAULT, help=LOGGER_HELP),
    image_size: Optional[int] = typer.Option(None, min=8, help="Input size [default: the backbone's]."),
    val_fraction: float = typer.Option(0.2, help="Share of each class held out when the data has no val split."),
    train_limit: Optional[int] = typer.Option(None, min=1, help="Use at most this many training images."),
    val_limit: Optional[int] = typer.Option(None, min=1, help="Use at most this many validation images."),
    augment: bool = typer.Option(True, help="Random resized crops (and flips where they make sense), plus the augmentations asked for."),
    pretrained: bool = typer.Option(True, help="Start from pretrained weights (hub or --checkpoint)."),
    checkpoint: Optional[Path] = typer.Option(None, help=CHECKPOINT_HELP),
    resume: bool = typer.Option(False, help="Continue the run in --out after its last finished epoch."),
    overwrite: bool = typer.Option(False, help="Replace an existing run in --out."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    grad_accum: int = typer.Option(1, min=1, help="Micro-batches per optimizer step (global batch = batch x processes x this)."),
    workers: int = typer.Option(0, min=0, help="DataLoader worker processes (pinned memory on CUDA)."),
    channels_last: bool = typer.Option(False, help="Channels-last memory layout (faster convolutions on GPUs)."),
    grad_checkpointing: bool = typer.Option(False, help="Recompute backbone activations in backward (timm's; less memory)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    low_memory: bool = typer.Option(False, help=LOW_MEMORY_HELP),
) -> None:
    """Fine-tune a backbone on an image dataset; writes a log, a plot, checkpoints and the adapter.

    With --resume, the run continues with the settings it started with (its run.json); a flag that
    asks for another setting is refused.
    """
    from ..train.loop import TrainConfig
    from ..train.run import RunConfig, run_training

    config = RunConfig(
        backbone=backbone, method=method, task=task, head=head, data=data or "", out_dir=str(out),
        options=_options(opt), data_options=_data_options(image_column, label_column, data_root, download),
        image_size=image_size, val_fraction=val_fraction, train_limit=train_limit, val_limit=val_limit,
        pretrained=pretrained, checkpoint=str(checkpoint) if checkpoint else None, augment=augment,
        auto_augment=auto_augment, reprob=reprob, color_jitter=color_jitter,
        backbone_options=_backbone_options(backbone_opt), resume=resume, overwrite=overwrite,
        channels_last=channels_last, grad_checkpointing=grad_checkpointing, compile=compile,
        train=TrainConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
            warmup_lr=warmup_lr, min_lr=min_lr, label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix,
            seed=seed, device=device, precision=precision, grad_accum=grad_accum, workers=workers,
            low_memory=low_memory, logger=logger,
        ),
    )
    if resume:
        config = _resumed_config(ctx, config)
    if not config.data:
        raise typer.BadParameter("--data is required (unless --resume continues a run that recorded it)")
    summary = run_training(config)
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, the main process reports
        from ..tasks.registry import get_task

        entry = get_task(config.task)
        if entry.segments:
            scores = f"mIoU {summary['miou']:.2f}%, pixel accuracy {summary['pixel_acc']:.2f}%"
        elif entry.detects:
            scores = f"box AP {summary['box_ap']:.2f}, AP50 {summary['box_ap50']:.2f}"
            if entry.masks:
                scores += f", mask AP {summary['mask_ap']:.2f}, AP50 {summary['mask_ap50']:.2f}"
        else:
            scores = f"top-1 {summary['top1']:.2f}%, top-5 {summary['top5']:.2f}%"
        console.print(
            f"[bold]{config.method}[/] on {config.backbone}: {scores}, {summary['trainable']:,} trainable "
            f"parameters; adapter in {out / 'adapter'}"
        )


TRAIN_FLAGS = {  # CLI parameter -> (RunConfig field, inside TrainConfig)
    "data": ("data", False), "image_column": ("data_options", False), "label_column": ("data_options", False),
    "data_root": ("data_options", False), "download": ("data_options", False), "backbone": ("backbone", False),
    "method": ("method", False), "task": ("task", False), "head": ("head", False),
    "opt": ("options", False), "backbone_opt": ("backbone_options", False), "image_size": ("image_size", False),
    "val_fraction": ("val_fraction", False), "train_limit": ("train_limit", False),
    "val_limit": ("val_limit", False), "augment": ("augment", False), "pretrained": ("pretrained", False),
    "checkpoint": ("checkpoint", False), "epochs": ("epochs", True), "batch_size": ("batch_size", True),
    "lr": ("lr", True), "weight_decay": ("weight_decay", True), "warmup_epochs": ("warmup_epochs", True),
    "label_smoothing": ("label_smoothing", True), "seed": ("seed", True), "device": ("device", True),
    "precision": ("precision", True), "grad_accum": ("grad_accum", True), "workers": ("workers", True),
    "channels_last": ("channels_last", False), "grad_checkpointing": ("grad_checkpointing", False),
    "compile": ("compile", False), "low_memory": ("low_memory", True),
    "warmup_lr": ("warmup_lr", True), "min_lr": ("min_lr", True), "mixup": ("mixup", True), "cutmix": ("cutmix", True),
    "auto_augment": ("auto_augment", False), "reprob": ("reprob", False), "color_jitter": ("color_jitter", False),
    "logger": ("logger", True),
}


def _resumed_config(ctx: typer.Context, config):
    """The run's recorded settings, with the flags the user gave on top (run_training refuses conflicts)."""
    from dataclasses import replace

    from ..train.run import RUN_FILE, config_from_settings, read_run_settings

    if not (Path(config.out_dir) / RUN_FILE).exists():
        return config
    saved = config_from_settings(read_run_settings(config.out_dir))
    top = {f: getattr(config, f) for p, (f, inner) in TRAIN_FLAGS.items() if not inner and _given(ctx, p)}
    inner = {f: getattr(config.train, f) for p, (f, nested) in TRAIN_FLAGS.items() if nested and _given(ctx, p)}
    return replace(saved, **top, out_dir=config.out_dir, resume=True, overwrite=config.overwrite,
                   train=replace(saved.train, **inner))



@app.command("plan")
def plan_methods(
    backbone: str = typer.Option(EMBEDDED_BACKBONE, help=BACKBONE_HELP),
    image_size: int = typer.Option(224, min=8, help="Training input size."),
    batch: int = typer.Option(32, min=1, help="The batch you want to train with (per device)."),
    method: Optional[List[str]] = typer.Option(None, help="Methods to plan (repeatable) [default: all that fit]."),
    task: str = typer.Option("classification", help="Task (classification)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    memory: Optional[str] = typer.Option(None, help="Memory budget, e.g. 24GB [default: the GPU's total; none on CPU]."),
    backbone_opt: Optional[List[str]] = typer.Option(None, help=BACKBONE_OPT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """Which method fits my device: measures each method at two small batches (fresh processes, random
    weights), extrapolates memory and step time linearly to --batch, and finds the largest batch that fits."""
    from ..methods import list_methods
    from ..model import method_misfit
    from ..plan import parse_memory, plan
    from ..train.device import resolve_device

    if task != "classification":
        raise typer.BadParameter(f"--task {task}: only classification is planned so far")
    target = resolve_device(device)
    budget = parse_memory(memory) if memory else None
    if budget is None and target.type == "cuda":
        import torch

        budget = torch.cuda.get_device_properties(target).total_memory
    options = _backbone_options(backbone_opt)
    chosen = method or [m for m in list_methods() if method_misfit(backbone, m, options) is None]

    def progress(index, total, name):
        if not as_json:
            err_console.print(f"[{index}/{total}] measuring {name} ...", highlight=False)

    rows = plan(backbone, chosen, image_size, batch, device=str(target), precision=precision, budget_bytes=budget,
                backbone_options=options or None, on_method=progress)
    if as_json:
        print(json.dumps([dict(r.__dict__) for r in rows]))
        return
    table = Table("method", f"memory at {batch} MiB", f"step at {batch} s", "fits", "largest batch",
                  title=f"{backbone}, {image_size} px, {precision} on {target}")
    for r in rows:
        table.add_row(r.method, f"{r.memory_bytes / 2**20:,.0f}", f"{r.step_seconds:.3f}",
                      "-" if r.fits is None else ("yes" if r.fits else "no"),
                      "-" if r.max_batch is None else str(r.max_batch))
    console.print(table)


@app.command("compare")
def compare_methods(
    data: str = typer.Option(EMBEDDED_DATA, help=DATA_HELP),
    image_column: Optional[str] = typer.Option(None, help=IMAGE_COLUMN_HELP),
    label_column: Optional[str] = typer.Option(None, help=LABEL_COLUMN_HELP),
    data_root: Optional[Path] = typer.Option(None, help=DATA_ROOT_HELP),
    download: bool = typer.Option(False, "--download", help=DOWNLOAD_HELP),
    backbone: str = typer.Option(EMBEDDED_BACKBONE, help=BACKBONE_HELP),
    method: Optional[List[str]] = typer.Option(None, help="Methods to compare (repeatable) [default: all]."),
    out: Path = typer.Option(Path("runs/compare"), help="Folder for runs, compare.md/.csv and the plot."),
    epochs: int = typer.Option(3, min=1),
    batch_size: int = typer.Option(32, min=1),
    image_size: int = typer.Option(64, min=8),
    train_limit: int = typer.Option(1000, min=1),
    val_limit: int = typer.Option(500, min=1),
    augment: bool = typer.Option(False, help="Random resized crops and flips while training."),
    checkpoint: Optional[Path] = typer.Option(None, help=CHECKPOINT_HELP),
    pretrained: bool = typer.Option(True),
    overwrite: bool = typer.Option(False, help="Retrain methods already finished in --out."),
    seed: int = typer.Option(0, help="Seed of the first run of each method."),
    seeds: int = typer.Option(1, min=1, help="Runs per method (seeds seed, seed+1, ...): the table shows mean and spread."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    nproc: int = typer.Option(1, min=1, help="Processes per method: each trains data-parallel under torchrun."),
    low_memory: bool = typer.Option(False, help=LOW_MEMORY_HELP),
    logger: str = typer.Option(LOGGER_DEFAULT, help=LOGGER_HELP),
) -> None:
    """The main job: fine-tune one backbone with every method; print a table and save a plot.

    With no arguments: real pretrained EfficientNet-Lite0 on real Fashion-MNIST (5 minutes on 2 idle CPU cores; far longer when other jobs share them).
    """
    from ..compare import CompareConfig, compare, noise_footer
    from ..train import TrainConfig

    config = CompareConfig(
        backbone=backbone, data=data, methods=tuple(method or ()), out_dir=str(out), image_size=image_size,
        data_options=_data_options(image_column, label_column, data_root, download),
        train_limit=train_limit, val_limit=val_limit, augment=augment, pretrained=pretrained,
        checkpoint=str(checkpoint) if checkpoint else None, overwrite=overwrite, seeds=seeds, nproc=nproc,
        train=TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, device=device, precision=precision,
                          low_memory=low_memory, logger=logger),
    )
    rows = compare(config, on_result=_report_method, on_skip=_report_skip, on_start=_report_start)
    console.print(comparison_table(rows, f"{backbone} on {data}"))
    console.print(noise_footer(rows), highlight=False)
    console.print(f"table: {out / 'compare.md'}, plot: {out / 'accuracy_vs_params.png'}", highlight=False)


def _report_start(number: int, total: int, method: str, seed: int, cached: bool) -> None:
    what = "cached from an earlier run" if cached else "training ..."
    console.print(f"[{number}/{total}] {method} (seed {seed}): {what}", markup=False, highlight=False)


def _report_method(row) -> None:
    spread = f" ± {row['top1_std']:.2f}" if row["seeds"] > 1 else ""
    when = "cached from an earlier run" if row["cached"] else "just trained"
    console.print(
        f"  {row['method']}: top-1 {row['top1']:.2f}%{spread}, {row['train_seconds']:.0f}s of training ({when})",
        markup=False, highlight=False,
    )


def _report_skip(name: str, reason: str) -> None:
    console.print(f"  {name}: skipped ({reason})", markup=False, highlight=False)


def comparison_table(rows, title: str) -> Table:
    from ..compare import mean_spread

    table = Table("method", "trainable", "trainable %", "top-1 %", "top-5 %", "within noise", "train s",
                  "peak mem. growth MB", title=title)
    for r in rows:
        table.add_row(r["method"], f"{r['trainable']:,}", f"{r['trainable_pct']:.2f}", mean_spread(r, "top1"),
                      mean_spread(r, "top5"), "yes" if r["within_noise"] else "no", f"{r['train_seconds']:.1f}",
                      f"{r['peak_memory_mb']:.0f}")
    return table


