"""The training loop: AdamW, warm-up then cosine, label smoothing, top-1/top-5.

Each epoch ends with a validation pass, a CSV row, a refreshed PNG plot and an
atomic checkpoint; ``resume=True`` continues after the last finished epoch.
"""

from __future__ import annotations

import csv
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import NonFiniteLossError
from ..io import ensure_writable_dir
from ..model import set_train_mode
from ..schedule import warmup_then_cosine
from .checkpoint import load_checkpoint, save_checkpoint
from .plots import plot_history

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.csv"
PLOT = "curves.png"


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    seed: int = 0
    progress: bool = True


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; weight decay only on matrices and kernels (as timm does):
    decaying biases, norm weights or SSF scales would pull them towards zero."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, progress: bool = False) -> dict:
    """Mean cross-entropy, top-1 and top-5 accuracy (percent) over ``loader``."""
    model.eval()
    loss_sum, top1, top5, seen = 0.0, 0, 0, 0
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not progress):
        logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels[:, None]).any(dim=1).sum().item()
        seen += labels.numel()
    return {"val_loss": loss_sum / seen, "top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen}


def train(model: nn.Module, train_set, val_set, config: TrainConfig, out_dir: Path, resume: bool = False) -> TrainResult:
    out_dir = Path(out_dir)
    ensure_writable_dir(out_dir)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=generator, drop_last=False)
    val_loader = DataLoader(val_set, batch_size=max(64, config.batch_size))
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = max(1, int(config.warmup_epochs * steps_per_epoch))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine(warmup_steps, total_steps))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    result, start_epoch = TrainResult(), 0
    checkpoint = out_dir / CHECKPOINT
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint, model, optimizer)
        start_epoch, result.history, result.train_seconds = state["epoch"], state["history"], state["train_seconds"]
        with warnings.catch_warnings():  # fast-forwarding the schedule, not skipping a step
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start_epoch * steps_per_epoch):
                schedule.step()

    for epoch in range(start_epoch, config.epochs):
        generator.manual_seed(config.seed + epoch)  # same batches and augmentations, resumed or not
        torch.manual_seed(config.seed + epoch)
        started = time.perf_counter()
        train_loss = _train_one_epoch(model, train_loader, optimizer, schedule, criterion, epoch, config)
        result.train_seconds += time.perf_counter() - started
        row = {"epoch": epoch + 1, "train_loss": train_loss, **evaluate(model, val_loader), "lr": schedule.get_last_lr()[0]}
        result.history.append(row)
        save_checkpoint(
            checkpoint, model, optimizer,
            {"epoch": epoch + 1, "history": result.history, "train_seconds": result.train_seconds},
        )
        _write_log(out_dir / LOG, result.history)
        plot_history(result.history, out_dir / PLOT)
        if config.progress:
            tqdm.write(
                f"epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.4f}, "
                f"val top-1 {row['top1']:.2f}%, top-5 {row['top5']:.2f}%"
            )
    return result


def _train_one_epoch(model, loader, optimizer, schedule, criterion, epoch, config) -> float:
    set_train_mode(model, True)
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not config.progress)
    for step, (images, labels) in enumerate(bar):
        loss = criterion(model(images), labels)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} in epoch {epoch + 1}, step {step + 1}; "
                "stopped, keeping the checkpoint of the last finished epoch (a smaller --lr may help)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += loss.item() * labels.numel()
        count += labels.numel()
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(1, count)


def _write_log(path: Path, history: list[dict]) -> None:
    from ..io import atomic_write

    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)
