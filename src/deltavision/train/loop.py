"""The training loop: timm's recipe (AdamW groups, cosine with warm-up, mixup), the objective's loss and metrics.

Device- and precision-agnostic (:mod:`.device`), data-parallel when launched
by torchrun (:mod:`.distributed`), with gradient accumulation and data-loader
workers. Each epoch ends with a validation pass, a CSV row (learning rate,
losses, the objective's metrics, peak memory, images/s), a TensorBoard or W&B
entry (:mod:`.loggers`), a refreshed PNG plot and an atomic checkpoint,
written by the main process only; ``resume=True`` continues after the last
finished epoch. A non-finite loss stops the run with
:class:`~deltavision.errors.NonFiniteLossError`, keeping the last good
checkpoint.

Importing this module imports no timm (the MIST edge trainer shares
:class:`TrainConfig`); :func:`train` takes its optimizer, schedule and mixup
from :mod:`.recipe`, which is timm's.
"""

from __future__ import annotations

import contextlib
import csv
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from ..errors import DataError, NonFiniteLossError
from ..io import ensure_writable_dir
from ..memory import peak_rss_bytes, release_large_blocks
from .checkpoint import load_checkpoint, save_checkpoint
from .device import autocast, check_precision, grad_scaler, resolve_device
from .distributed import World, all_sum, barrier, setup
from .objectives import ClassificationObjective, Objective

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.csv"
PLOT = "curves.png"


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 32  # per process; the global batch is batch_size x processes x grad_accum
    lr: float | None = None  # None: the method's default, settled by train.run.resolve_run
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    warmup_lr: float = 1e-6  # the rate of the first update; it rises linearly to lr over warmup_epochs
    min_lr: float = 0.0  # where the cosine ends, at the last update
    label_smoothing: float = 0.1
    mixup: float = 0.0  # mixup's Beta alpha (classification; 0: off), as timm's --mixup
    cutmix: float = 0.0  # cutmix's Beta alpha (classification; 0: off), as timm's --cutmix
    seed: int = 0
    progress: bool = True
    device: str = "auto"
    precision: str = "fp32"
    grad_accum: int = 1
    workers: int = 0
    low_memory: bool = False  # CPU: return freed blocks at once (deltavision.memory); less RSS, slower steps
    logger: str = "auto"  # besides log.csv: tensorboard (auto: when installed), wandb or csv (see .loggers)

    def __post_init__(self):
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be at least 1, got {self.grad_accum}")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def evaluate(model: nn.Module, loader, progress: bool = False, device: torch.device | None = None,
             precision: str = "fp32", world: World = World()) -> dict:
    """Mean cross-entropy, top-1 and top-5 accuracy (percent) over ``loader`` (summed over processes)."""
    return ClassificationObjective().evaluate(model, loader, progress, device, precision, world)


@dataclass
class _Run:
    """What one training run holds while it trains."""

    model: nn.Module
    net: nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    schedule: Any  # timm's CosineLRScheduler, stepped with step_update(updates)
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    mixer: Any  # timm's Mixup turning (images, labels) into mixed images and soft targets, or None
    device: torch.device
    world: World
    config: TrainConfig
    objective: Objective
    updates: int = 0  # optimizer updates made so far (the schedule's clock)
    logger: Any = None  # main process: the .loggers logger


def train(model: nn.Module, train_set, val_set, config: TrainConfig, out_dir: Path, resume: bool = False,
          objective: Objective | None = None, recipe=None) -> TrainResult:
    """Train ``model`` in place on ``train_set``, validating on ``val_set`` after every epoch.

    ``objective`` says what is optimised and scored (default: classification;
    mixup and cutmix need it built with the number of classes). ``recipe``
    makes the optimizer and the schedule (``make_optimizer(model, config)``,
    ``make_scheduler(optimizer, config, steps_per_epoch)`` with a
    ``step_update(updates)``): timm's (:mod:`.recipe`) by default; the MIST
    edge passes its timm-free one.
    """
    if recipe is None:
        from . import recipe

    objective = objective or ClassificationObjective()
    out_dir = Path(out_dir)
    device = resolve_device(config.device)
    check_precision(device, config.precision)
    world = setup(device)
    if device.type == "cpu" and config.low_memory:
        release_large_blocks()
    if world.is_main:
        ensure_writable_dir(out_dir)
    net, model = model, getattr(model, "_orig_mod", model)  # torch.compile'd: save the module it wraps
    model.to(device)
    sampler = DistributedSampler(train_set, num_replicas=world.size, rank=world.rank, shuffle=True, seed=config.seed)
    drop_last = objective.drop_last(config) and len(train_set) // world.size > config.batch_size
    train_loader = _loader(train_set, config, device, sampler=sampler, drop_last=drop_last,
                           collate=objective.collate)
    val_loader = _loader(Subset(val_set, range(world.rank, len(val_set), world.size)), config, device,
                         batch_size=max(objective.val_batch_floor, config.batch_size), collate=objective.collate)
    optimizer = recipe.make_optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)
    run = _Run(
        model=model, net=_data_parallel(net, device, world), optimizer=optimizer,
        schedule=recipe.make_scheduler(optimizer, config, steps_per_epoch), scaler=grad_scaler(device, config.precision),
        criterion=objective.criterion(config), mixer=objective.mixer(config), device=device, world=world,
        config=config, objective=objective,
    )
    result, start_epoch = TrainResult(), 0
    checkpoint = out_dir / CHECKPOINT
    if resume and checkpoint.exists():
        start_epoch = _resume(run, checkpoint, result, steps_per_epoch)
    if world.is_main:
        from .loggers import open_logger

        run.logger = open_logger(config.logger, out_dir, first_epoch=start_epoch + 1, settings=asdict(config))
    try:
        for epoch in range(start_epoch, config.epochs):
            result.history.append(_epoch(run, epoch, sampler, train_loader, val_loader, result))
            if world.is_main:
                _save_epoch(run, out_dir, result)
            barrier(world)
    finally:
        if run.logger is not None:
            run.logger.close()
    return result


def _epoch(run: _Run, epoch: int, sampler, train_loader, val_loader, result: TrainResult) -> dict:
    """Train one epoch and validate; the epoch's history row."""
    config, device = run.config, run.device
    sampler.set_epoch(epoch)  # the same shuffling in every process, resumed or not
    _seed_epoch(config.seed + epoch)  # the same augmentations and mixing, resumed or not
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    train_loss, images = _train_one_epoch(run, train_loader, epoch)
    seconds = time.perf_counter() - started
    result.train_seconds += seconds
    metrics = run.objective.evaluate(run.model, val_loader, device=device, precision=config.precision,
                                     world=run.world)
    return {"epoch": epoch + 1, "train_loss": train_loss, **metrics, "lr": _current_lr(run),
            "process_peak_memory_mb": _peak_memory_bytes(device) / 2**20, "images_per_s": images / max(seconds, 1e-9)}


def _seed_epoch(seed: int) -> None:
    """Seed every generator the augmentations draw from: torch's, Python's (timm's transforms) and
    NumPy's (timm's Mixup)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _current_lr(run: _Run) -> float:
    """The learning rate the next update would use (after the epoch's last update)."""
    return run.optimizer.param_groups[0]["lr"]


def _peak_memory_bytes(device: torch.device) -> int:
    """This epoch's peak CUDA memory allocated on a GPU; elsewhere the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def _loader(dataset, config: TrainConfig, device: torch.device, sampler=None, batch_size: int | None = None,
            drop_last: bool = False, collate=None):
    return DataLoader(
        dataset, batch_size=batch_size or config.batch_size, sampler=sampler, num_workers=config.workers,
        pin_memory=device.type == "cuda", persistent_workers=config.workers > 0, drop_last=drop_last,
        collate_fn=collate,
    )


def _data_parallel(model: nn.Module, device: torch.device, world: World) -> nn.Module:
    if not world.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _resume(run: _Run, checkpoint: Path, result: TrainResult, steps_per_epoch: int) -> int:
    state = load_checkpoint(checkpoint, run.model, run.optimizer)
    result.history, result.train_seconds = state["history"], state["train_seconds"]
    run.updates = state.get("updates", state["epoch"] * steps_per_epoch)
    if run.updates:
        run.schedule.step_update(run.updates)  # the schedule is a function of the update count: exact
    if run.config.progress and run.world.is_main:
        done, total = state["epoch"], run.config.epochs
        tqdm.write(f"resuming at epoch {done + 1} of {total}" if done < total
                   else f"the run finished all {total} epochs; nothing left to train")
    return state["epoch"]


def _save_epoch(run: _Run, out_dir: Path, result: TrainResult) -> None:
    row = result.history[-1]
    save_checkpoint(
        out_dir / CHECKPOINT, run.model, run.optimizer,
        {"epoch": row["epoch"], "updates": run.updates, "history": result.history,
         "train_seconds": result.train_seconds},
    )
    from .plots import plot_history  # matplotlib, only where runs are written

    _write_log(out_dir / LOG, result.history)
    run.logger.log(row)
    plot_history(result.history, out_dir / PLOT, run.objective.plotted)
    if run.config.progress:
        tqdm.write(
            f"epoch {row['epoch']}/{run.config.epochs}: train loss {row['train_loss']:.4f}, "
            f"{run.objective.summary(row)}"
        )


def _train_one_epoch(run: _Run, loader, epoch: int) -> tuple[float, int]:
    """One pass over this process's shard; the mean training loss and the images trained, over every process."""
    run.net.train()
    config, total, count, seen = run.config, 0.0, 0, 0
    show = config.progress and run.world.is_main
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not show)
    batches = len(loader)
    for index, (images, labels) in enumerate(bar):
        images, labels = run.objective.to_device(images, labels, run.device)
        last_of_step = (index + 1) % config.grad_accum == 0 or index + 1 == batches
        targets = labels if run.mixer is None else None
        if run.mixer is not None:
            images, targets = _mix(run.mixer, images, labels)
        with _sync_gradients(run.net, last_of_step):
            with autocast(run.device, config.precision):
                loss = run.objective.loss(run.net, images, targets, run.criterion)
            _check_finite(loss, run.world, run.device, epoch, index)
            run.scaler.scale(loss / _micro_batches_in_step(index, batches, config.grad_accum)).backward()
        if last_of_step:
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            run.updates += 1
            run.schedule.step_update(run.updates)
        items = run.objective.count(labels)
        total += loss.item() * items
        count += items
        seen += images.shape[0]
        bar.set_postfix(loss=f"{total / count:.4f}")
    total, count, seen = all_sum([total, count, seen], run.world, run.device)
    return total / max(1, count), int(seen)


def _mix(mixer, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed images and soft targets; mixing pairs images, so an odd batch is refused clearly."""
    if images.shape[0] % 2:
        raise DataError(
            f"mixup/cutmix pair the images of a batch, but a batch holds {images.shape[0]} (odd): use an even "
            "--batch-size and at least that many training images per process"
        )
    return mixer(images, labels)


def _micro_batches_in_step(index: int, batches: int, accum: int) -> int:
    """How many micro-batches the optimizer step containing batch ``index`` averages over."""
    first = index - index % accum
    return min(accum, batches - first)


def _sync_gradients(net: nn.Module, sync: bool):
    """DDP averages gradients only on a step's last micro-batch."""
    return net.no_sync() if isinstance(net, DistributedDataParallel) and not sync else contextlib.nullcontext()


def _check_finite(loss: torch.Tensor, world: World, device: torch.device, epoch: int, index: int) -> None:
    bad = 0.0 if torch.isfinite(loss).item() else 1.0
    if world.distributed:
        bad = all_sum([bad], world, device)[0]
    if bad:
        raise NonFiniteLossError(
            f"the training loss became non-finite ({loss.item()}) at epoch {epoch + 1}, batch {index + 1}; "
            "the last finished epoch's checkpoint is kept. Try a lower --lr (or --precision fp32)"
        )


def _write_log(path: Path, history: list[dict]) -> None:
    from ..io import atomic_write

    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)
