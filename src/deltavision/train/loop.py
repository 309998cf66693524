"""The training loop: AdamW, warm-up then cosine, label smoothing, top-1/top-5.

Device- and precision-agnostic (:mod:`.device`), data-parallel when launched
by torchrun (:mod:`.distributed`), with gradient accumulation and data-loader
workers. Each epoch ends with a validation pass, a CSV row, a refreshed PNG
plot and an atomic checkpoint, written by the main process only;
``resume=True`` continues after the last finished epoch. A non-finite loss
stops the run with :class:`~deltavision.errors.NonFiniteLossError`, keeping
the last good checkpoint. Imports no timm: the MIST edge trainer uses it too.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from ..errors import NonFiniteLossError
from ..io import ensure_writable_dir
from ..memory import release_large_blocks
from ..schedule import warmup_then_cosine
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
    label_smoothing: float = 0.1
    seed: int = 0
    progress: bool = True
    device: str = "auto"
    precision: str = "fp32"
    grad_accum: int = 1
    workers: int = 0
    low_memory: bool = False  # CPU: return freed blocks at once (deltavision.memory); less RSS, slower steps

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


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (see :func:`parameter_groups`) at ``config.lr``."""
    if config.lr is None:
        raise ValueError("TrainConfig.lr is unset: resolve the run first (deltavision.train.resolve_run)")
    return torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)


def make_schedule(optimizer, config: TrainConfig, steps_per_epoch: int, epochs: int | None = None):
    """Linear warm-up over ``config.warmup_epochs``, then a half cosine to zero, stepped per batch."""
    total_steps = steps_per_epoch * (config.epochs if epochs is None else epochs)
    warmup_steps = max(1, int(config.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine(warmup_steps, total_steps))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; weight decay only on matrices and kernels (as timm does):
    decaying biases, norm weights or SSF scales would pull them towards zero."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    device: torch.device
    world: World
    config: TrainConfig
    objective: Objective


def train(model: nn.Module, train_set, val_set, config: TrainConfig, out_dir: Path, resume: bool = False,
          objective: Objective | None = None) -> TrainResult:
    """Train ``model`` in place on ``train_set``, validating on ``val_set`` after every epoch.

    ``objective`` says what is optimised and scored (default: classification).
    """
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
    drop_last = objective.drop_last and len(train_set) // world.size > config.batch_size
    train_loader = _loader(train_set, config, device, sampler=sampler, drop_last=drop_last,
                           collate=objective.collate)
    val_loader = _loader(Subset(val_set, range(world.rank, len(val_set), world.size)), config, device,
                         batch_size=max(objective.val_batch_floor, config.batch_size), collate=objective.collate)
    optimizer = make_optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)
    run = _Run(
        model=model, net=_data_parallel(net, device, world), optimizer=optimizer,
        schedule=make_schedule(optimizer, config, steps_per_epoch), scaler=grad_scaler(device, config.precision),
        criterion=objective.criterion(config.label_smoothing), device=device, world=world,
        config=config, objective=objective,
    )
    result, start_epoch = TrainResult(), 0
    checkpoint = out_dir / CHECKPOINT
    if resume and checkpoint.exists():
        start_epoch = _resume(run, checkpoint, result, steps_per_epoch)

    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)  # the same shuffling in every process, resumed or not
        torch.manual_seed(config.seed + epoch)  # the same augmentations, resumed or not
        started = time.perf_counter()
        train_loss = _train_one_epoch(run, train_loader, epoch)
        result.train_seconds += time.perf_counter() - started
        metrics = objective.evaluate(model, val_loader, device=device, precision=config.precision, world=world)
        row = {"epoch": epoch + 1, "train_loss": train_loss, **metrics, "lr": run.schedule.get_last_lr()[0]}
        result.history.append(row)
        if world.is_main:
            _save_epoch(run, out_dir, result)
        barrier(world)
    return result


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
    with warnings.catch_warnings():  # fast-forwarding the schedule, not skipping a step
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(state["epoch"] * steps_per_epoch):
            run.schedule.step()
    if run.config.progress and run.world.is_main:
        done, total = state["epoch"], run.config.epochs
        tqdm.write(f"resuming at epoch {done + 1} of {total}" if done < total
                   else f"the run finished all {total} epochs; nothing left to train")
    return state["epoch"]


def _save_epoch(run: _Run, out_dir: Path, result: TrainResult) -> None:
    row = result.history[-1]
    save_checkpoint(
        out_dir / CHECKPOINT, run.model, run.optimizer,
        {"epoch": row["epoch"], "history": result.history, "train_seconds": result.train_seconds},
    )
    from .plots import plot_history  # matplotlib, only where runs are written

    _write_log(out_dir / LOG, result.history)
    plot_history(result.history, out_dir / PLOT, run.objective.plotted)
    if run.config.progress:
        tqdm.write(
            f"epoch {row['epoch']}/{run.config.epochs}: train loss {row['train_loss']:.4f}, "
            f"{run.objective.summary(row)}"
        )


def _train_one_epoch(run: _Run, loader, epoch: int) -> float:
    """One pass over this process's shard; returns the mean training loss over every process."""
    run.net.train()
    config, total, count = run.config, 0.0, 0
    show = config.progress and run.world.is_main
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not show)
    batches = len(loader)
    for index, (images, labels) in enumerate(bar):
        images, labels = run.objective.to_device(images, labels, run.device)
        last_of_step = (index + 1) % config.grad_accum == 0 or index + 1 == batches
        with _sync_gradients(run.net, last_of_step):
            with autocast(run.device, config.precision):
                loss = run.objective.loss(run.net, images, labels, run.criterion)
            _check_finite(loss, run.world, run.device, epoch, index)
            run.scaler.scale(loss / _micro_batches_in_step(index, batches, config.grad_accum)).backward()
        if last_of_step:
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            run.schedule.step()
        items = run.objective.count(labels)
        total += loss.item() * items
        count += items
        bar.set_postfix(loss=f"{total / count:.4f}")
    total, count = all_sum([total, count], run.world, run.device)
    return total / max(1, count)


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
