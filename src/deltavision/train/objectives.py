"""What the training loop optimises and scores, per task: the loss, batch mixing, the validation metrics.

Imports no timm at import time (the MIST edge trainer shares the loop's
module); mixup/cutmix and top-k accuracy come from timm when they are used.
Mixup, cutmix and label smoothing are classification's only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..tasks.metrics import ConfusionMatrix
from .device import autocast
from .distributed import World, all_sum


def _default_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def mixes(config) -> bool:
    """Whether ``config`` (a TrainConfig) asks for mixup or cutmix."""
    return config.mixup > 0 or config.cutmix > 0


class ClassificationObjective:
    """Label-smoothed cross-entropy, or with mixup/cutmix soft-target cross-entropy on mixed batches;
    top-1 and top-5 accuracy (percent, ``timm.utils.accuracy``).

    ``num_classes`` is needed only to mix (the soft targets are one-hot vectors).
    """

    task = "classification"
    plotted = {"top1": "top-1", "top5": "top-5"}

    def __init__(self, num_classes: int | None = None):
        self.num_classes = num_classes

    def drop_last(self, config) -> bool:
        """Mixing pairs images, so a ragged last batch (possibly odd) is dropped."""
        return mixes(config)

    def criterion(self, config) -> nn.Module:
        if mixes(config):
            from .recipe import soft_target_loss

            return soft_target_loss()
        return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    def mixer(self, config):
        """timm's Mixup turning ``(images, labels)`` into mixed images and soft targets, or None."""
        if not mixes(config):
            return None
        if self.num_classes is None:
            raise ValueError("mixup/cutmix need the number of classes: ClassificationObjective(num_classes=...)")
        from .recipe import make_mixup

        return make_mixup(config, self.num_classes)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, progress: bool = False, device: torch.device | None = None,
                 precision: str = "fp32", world: World = World()) -> dict:
        """Mean cross-entropy, top-1 and top-5 accuracy over ``loader`` (summed over processes)."""
        from timm.utils import accuracy

        device = device or _default_device(model)
        model.eval()
        loss_sum, top1, top5, seen = 0.0, 0, 0, 0
        for images, labels in tqdm(loader, desc="eval", leave=False, disable=not progress):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(images)
            logits = logits.float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            batch_top1, batch_top5 = accuracy(logits, labels, topk=(1, 5))  # percent; top-5 is top-C under 5 classes
            top1 += round(batch_top1.item() * labels.numel() / 100)
            top5 += round(batch_top5.item() * labels.numel() / 100)
            seen += labels.numel()
        loss_sum, top1, top5, seen = all_sum([loss_sum, top1, top5, seen], world, device)
        return {"val_loss": loss_sum / seen, "top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen}

    def summary(self, row: dict) -> str:
        return f"val top-1 {row['top1']:.2f}%, top-5 {row['top5']:.2f}%"


class SegmentationObjective:
    """Per-pixel cross-entropy (``ignore_index`` pixels left out); mIoU, pixel accuracy, IoU per class.

    The last training batch is dropped when it would hold one image: the
    decoders' BatchNorms cannot normalise a single 1 x 1 pooled map.
    """

    task = "segmentation"
    plotted = {"miou": "mIoU", "pixel_acc": "pixel accuracy"}

    def __init__(self, classes: list[str], ignore_index: int = 255):
        self.classes, self.ignore_index = list(classes), ignore_index

    def drop_last(self, config) -> bool:
        return True

    def criterion(self, config) -> nn.Module:
        return nn.CrossEntropyLoss(ignore_index=self.ignore_index)

    def mixer(self, config):
        """Segmentation mixes nothing (run.resolve_run refuses --mixup/--cutmix for it)."""
        return None

    @torch.no_grad()
    def confusion(self, model: nn.Module, loader, progress: bool = False, device: torch.device | None = None,
                  precision: str = "fp32", world: World = World()) -> tuple[ConfusionMatrix, float]:
        """The confusion matrix and summed cross-entropy over ``loader`` (summed over processes)."""
        device = device or _default_device(model)
        model.eval()
        matrix, loss_sum = ConfusionMatrix(len(self.classes), self.ignore_index, device), 0.0
        for images, masks in tqdm(loader, desc="eval", leave=False, disable=not progress):
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(images)
            logits = logits.float()
            loss_sum += nn.functional.cross_entropy(
                logits, masks, ignore_index=self.ignore_index, reduction="sum"
            ).item()
            matrix.update(logits.argmax(dim=1), masks)
        if world.distributed:
            dist.all_reduce(matrix.counts)
        loss_sum = all_sum([loss_sum], world, device)[0]
        return matrix, loss_sum

    def evaluate(self, model: nn.Module, loader, progress: bool = False, device: torch.device | None = None,
                 precision: str = "fp32", world: World = World()) -> dict:
        matrix, loss_sum = self.confusion(model, loader, progress, device, precision, world)
        pixels = max(1, int(matrix.counts.sum()))
        row = {"val_loss": loss_sum / pixels, "miou": matrix.mean_iou(), "pixel_acc": matrix.pixel_accuracy()}
        for name, iou in zip(self.classes, matrix.per_class_iou()):
            row[f"iou/{name}"] = float("nan") if iou is None else iou
        return row

    def summary(self, row: dict) -> str:
        return f"val mIoU {row['miou']:.2f}%, pixel accuracy {row['pixel_acc']:.2f}%"


def objective_for(task: str, classes: list[str] | None = None):
    """The objective of ``task`` ("classification" or "segmentation", which needs the class names)."""
    if task == "segmentation":
        return SegmentationObjective(classes or [])
    return ClassificationObjective(len(classes) if classes else None)
