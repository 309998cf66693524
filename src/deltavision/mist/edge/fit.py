"""Training and evaluating the edge network on cached features, and choosing k (MIST, Sec. 3.2-3.3).

AdamW with linear warm-up then cosine decay (timm's CosineLRScheduler curve,
computed here: an edge device has no timm), label-smoothed cross-entropy,
weight decay on matrices only. Batches are read from the local feature store
row by row, so memory holds one batch of features, never the dataset. A loss
that stops being finite ends training with :class:`NonFiniteLossError` rather
than saving a NaN model.

k is chosen as the paper does: train briefly for every candidate in
{N/4, N/2, 3N/4, N} and keep the best validation top-1 (ties go to the larger k).

Segmentation (:class:`MaskedFeatureSet`, :func:`train_segmentation_edge`) runs
the main training loop itself (:func:`deltavision.train.loop.train` with its
:class:`~deltavision.train.objectives.SegmentationObjective`): per-pixel
cross-entropy ignoring 255, mIoU, pixel accuracy and per-class IoU after every
epoch, written to ``log.csv`` and ``curves.png``; k is chosen by val mIoU.

Its configuration and non-finite-loss error are the main trainer's
(:mod:`deltavision.train.loop`, importable without timm); the trainer takes
its optimizer groups and schedule from timm (:mod:`deltavision.train.recipe`),
so this module keeps the one timm-free copy of both (:class:`EdgeRecipe`, which
segmentation hands to the main loop), and like the rest of the
edge side never imports timm.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ...errors import NonFiniteLossError
from ...train.device import resolve_device
from ...train.loop import TrainConfig, train
from ...train.objectives import SegmentationObjective
from .network import EdgeNetwork, SegmentationEdgeNetwork
from .store import FeatureStore


@dataclass
class FitConfig(TrainConfig):
    """The trainer's settings with the edge's defaults, plus the epochs each candidate k trains for."""

    epochs: int = 10
    lr: float | None = 3e-3
    warmup_epochs: float = 1.0
    select_epochs: int = 3


@dataclass
class FeatureSet:
    """Labelled images of one split, read from ``store`` as Gather_k in ``dtype``.

    ``shape`` (T, C), when given, is checked on every row read.
    """

    store: FeatureStore
    k: int
    dtype: str
    digests: list[str]
    labels: torch.Tensor
    shape: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.digests)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(float32 features, labels) batches, shuffled when a generator is given."""
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            rows = order[start : start + batch_size].tolist()
            features = self.store.read(self.k, self.dtype, [self.digests[i] for i in rows], self.shape)
            yield features, self.labels[rows]


def train_edge(model: EdgeNetwork, train: FeatureSet, config: FitConfig, val: FeatureSet | None = None, epochs: int | None = None) -> list[dict]:
    """Train ``model`` in place; one history row per epoch (train loss, and val metrics if given)."""
    epochs = config.epochs if epochs is None else epochs
    device = resolve_device(config.device)
    model.to(device)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    optimizer = torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr)
    learning_rate = warmup_cosine(config, steps_per_epoch * epochs, int(config.warmup_epochs * steps_per_epoch))
    updates = 0
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(total=epochs * steps_per_epoch, desc=f"edge k={train.k}", unit="step", disable=not config.progress)
    history = []
    with bar:  # closed (ending its line) before any error is reported
        for epoch in range(1, epochs + 1):
            model.train()
            loss_sum = 0.0
            for step, (features, labels) in enumerate(train.batches(config.batch_size, generator), start=1):
                features, labels = features.to(device), labels.to(device)
                loss = criterion(model(features), labels)
                _check_finite(loss, epoch, step, train.k, config.lr)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(updates)
                optimizer.step()
                updates += 1
                loss_sum += loss.item() * len(labels)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            row = {"epoch": epoch, "train_loss": loss_sum / len(train)}
            if val is not None:
                row.update(evaluate_edge(model, val))
            history.append(row)
    return history


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in AdamW groups, weight decay on matrices only (as timm's ``param_groups_weight_decay``)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def warmup_cosine(config: TrainConfig, total: int, warmup: int) -> Callable[[int], float]:
    """The learning rate of update ``t`` (0-based) as timm's CosineLRScheduler gives it with a warm-up prefix:
    linear from ``config.warmup_lr`` over ``warmup`` updates, then a half cosine from ``config.lr`` to
    ``config.min_lr`` at update ``total``."""
    warmup = min(warmup, max(0, total - 1))
    span = max(1, total - warmup)

    def rate(t: int) -> float:
        if t < warmup:
            return config.warmup_lr + t * (config.lr - config.warmup_lr) / warmup
        done = min(t - warmup, span)
        return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * done / span))

    return rate


class _EdgeSchedule:
    """:func:`warmup_cosine` with timm's scheduler interface (``step_update(updates)``), for the main loop."""

    def __init__(self, optimizer: torch.optim.Optimizer, rate: Callable[[int], float]):
        self.optimizer, self.rate = optimizer, rate
        self.step_update(0)

    def step_update(self, updates: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.rate(updates)


class EdgeRecipe:
    """The main loop's optimizer and schedule without timm (:func:`decay_groups`, :func:`warmup_cosine`)."""

    @staticmethod
    def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
        return torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr)

    @staticmethod
    def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> _EdgeSchedule:
        total = steps_per_epoch * config.epochs
        return _EdgeSchedule(optimizer, warmup_cosine(config, total, int(config.warmup_epochs * steps_per_epoch)))


def _check_finite(loss: torch.Tensor, epoch: int, step: int, k: int, lr: float) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"the training loss became {loss.item()} at epoch {epoch}, step {step} (k={k}); the features hold "
            f"non-finite values or the learning rate {lr:g} is too high; nothing was saved"
        )


@torch.no_grad()
def evaluate_edge(model: EdgeNetwork, data: FeatureSet, batch_size: int = 64) -> dict:
    """Mean cross-entropy and top-1 accuracy (percent) on ``data``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    device = next(model.parameters()).device
    for features, labels in data.batches(batch_size):
        features, labels = features.to(device), labels.to(device)
        logits = model(features)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
    return {"val_loss": loss_sum / len(data), "top1": 100.0 * correct / len(data), "images": len(data)}


def select_k(
    ks: Sequence[int],
    make_model: Callable[[int], EdgeNetwork],
    splits: Callable[[int], tuple[FeatureSet, FeatureSet]],
    config: FitConfig,
    score: Callable | None = None,
) -> tuple[int, dict[int, float]]:
    """Best k by ``score(model, train, val, config)`` (default: val top-1 after
    ``config.select_epochs`` of training, Sec. 3.2); ties go to the larger k."""
    score = score or _top1_after_training
    scores = {}
    for k in ks:
        torch.manual_seed(config.seed)
        train_set, val = splits(k)
        scores[k] = score(make_model(k), train_set, val, config)
    best = max(ks, key=lambda k: (scores[k], k))
    return best, scores


def _top1_after_training(model: EdgeNetwork, train_set: FeatureSet, val: FeatureSet, config: FitConfig) -> float:
    train_edge(model, train_set, config, epochs=config.select_epochs)
    return evaluate_edge(model, val)["top1"]


# --- segmentation ---------------------------------------------------------------------------------


@dataclass
class MaskedFeatureSet(Dataset):
    """(Gather_k features (T, C), mask (S, S) int64) items of one split, both read from ``store``.

    ``__getitems__`` reads a whole batch at once (one pass over each shard), as the DataLoader asks.
    """

    store: FeatureStore
    k: int
    dtype: str
    digests: list[str]
    mask_size: int
    num_classes: int
    shape: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.digests)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        names = [self.digests[i] for i in indices]
        features = self.store.read(self.k, self.dtype, names, self.shape)
        masks = self.store.read_masks(self.mask_size, names, self.num_classes)
        return list(zip(features, masks))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]


def train_segmentation_edge(
    model: SegmentationEdgeNetwork, train_set: MaskedFeatureSet, val: MaskedFeatureSet, config: FitConfig,
    out_dir: Path, epochs: int | None = None,
) -> list[dict]:
    """Train ``model`` in place with the main loop; per-epoch rows (mIoU, pixel accuracy, IoU per class)
    also land in ``out_dir``/log.csv and curves.png."""
    config = replace(config, epochs=config.epochs if epochs is None else epochs)
    objective = SegmentationObjective(model.config.classes)
    return train(model, train_set, val, config, out_dir, objective=objective, recipe=EdgeRecipe).history


def miou_after_training(model: SegmentationEdgeNetwork, train_set: MaskedFeatureSet, val: MaskedFeatureSet,
                        config: FitConfig) -> float:
    """Val mIoU after ``config.select_epochs`` (k selection; the run's files go to a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="deltavision-k-") as folder:
        history = train_segmentation_edge(model, train_set, val, config, Path(folder), epochs=config.select_epochs)
    return history[-1]["miou"]


def evaluate_segmentation_edge(model: SegmentationEdgeNetwork, data: MaskedFeatureSet, batch_size: int = 32) -> dict:
    """val_loss, mIoU, pixel accuracy and ``iou/<class>`` (percent) of ``model`` on ``data``."""
    loader = DataLoader(data, batch_size=batch_size)
    return SegmentationObjective(model.config.classes).evaluate(model, loader)
