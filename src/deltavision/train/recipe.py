"""timm's training recipe: AdamW parameter groups, cosine schedule with warm-up, mixup/cutmix.

The trainer (:mod:`.loop`) imports this module only when it trains, so the
loop stays importable without timm: the MIST edge trainer shares its
configuration and keeps its own timm-free schedule (:mod:`deltavision.mist.edge.fit`).
"""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn


def make_optimizer(model: nn.Module, config) -> torch.optim.AdamW:
    """AdamW at ``config.lr`` over the trainable parameters, grouped by timm's ``param_groups_weight_decay``:
    weight decay on matrices and kernels only (decaying biases, norm weights or SSF scales would pull
    them towards zero)."""
    if config.lr is None:
        raise ValueError("TrainConfig.lr is unset: resolve the run first (deltavision.train.resolve_run)")
    return torch.optim.AdamW(param_groups_weight_decay(model, config.weight_decay), lr=config.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, config, steps_per_epoch: int,
                   epochs: int | None = None) -> CosineLRScheduler:
    """timm's cosine schedule, stepped per optimizer update (``step_update(updates)``).

    The rate rises linearly from ``config.warmup_lr`` over ``config.warmup_epochs``,
    then follows a half cosine from ``config.lr`` to ``config.min_lr`` at the last
    update. A pure function of the update count, so a resumed run continues it
    exactly by calling ``step_update`` with the updates already made.
    """
    total = steps_per_epoch * (config.epochs if epochs is None else epochs)
    warmup = min(int(config.warmup_epochs * steps_per_epoch), max(0, total - 1))
    return CosineLRScheduler(
        optimizer, t_initial=max(1, total - warmup), lr_min=config.min_lr, warmup_t=warmup,
        warmup_lr_init=config.warmup_lr, warmup_prefix=True, t_in_epochs=False,
    )


def make_mixup(config, num_classes: int) -> Mixup:
    """timm's Mixup/CutMix (``config.mixup``/``config.cutmix`` are the Beta alphas; with both, each
    batch picks one at random), producing label-smoothed soft targets."""
    return Mixup(
        mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
        num_classes=num_classes,
    )


def soft_target_loss() -> nn.Module:
    """Cross-entropy against mixed soft targets (timm's ``SoftTargetCrossEntropy``)."""
    return SoftTargetCrossEntropy()
