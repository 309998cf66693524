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
from ..tasks.registry import get_task
from .device import autocast
from .distributed import World, all_sum


def _default_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def mixes(config) -> bool:
    """Whether ``config`` (a TrainConfig) asks for mixup or cutmix."""
    return config.mixup > 0 or config.cutmix > 0


class Objective:
    """What every objective shares: a batch is (images, labels) tensors; the loss is ``criterion(net(images), labels)``."""

    collate = None  # the DataLoader's default collation
    val_batch_floor = 64  # validation batches hold at least this many images

    def to_device(self, images, labels, device: torch.device):
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    def loss(self, net: nn.Module, images, labels, criterion: nn.Module) -> torch.Tensor:
        return criterion(net(images).float(), labels)

    def drop_last(self, config) -> bool:
        """Whether the training loader drops a ragged last batch."""
        return False

    def mixer(self, config):
        """What mixes training batches (timm's Mixup), or None."""
        return None

    def count(self, labels) -> int:
        """How many items the batch's mean loss averages over (the running training loss weighs by it)."""
        return labels.numel()


class ClassificationObjective(Objective):
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


class SegmentationObjective(Objective):
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


def collate_detection(batch: list) -> tuple[torch.Tensor, list[dict]]:
    """Stack the (equal-sized) images; keep the targets a list of dicts, as torchvision's detectors take them."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


class DetectionObjective(Objective):
    """The detector's own loss dict, summed; COCO box (and mask) AP, AP50, AP75 in percent.

    AP comes from torchmetrics' ``MeanAveragePrecision`` on the pycocotools
    backend (COCOeval: AP averaged over IoU 0.50:0.95, 101 recall points, 100
    detections per image). Mask AP thresholds Mask R-CNN's mask probabilities at 0.5.
    """

    collate = staticmethod(collate_detection)
    val_batch_floor = 1

    def __init__(self, classes: list[str], masks: bool = False):
        self.classes, self.masks = list(classes), masks
        self.task = "instance" if masks else "detection"
        kinds = (("box", "box"), ("mask", "mask")) if masks else (("box", "box"),)
        self.plotted = {f"{key}_{ap}": f"{label} {name}" for key, label in kinds
                        for ap, name in (("ap", "AP"), ("ap50", "AP50"), ("ap75", "AP75"))}

    def drop_last(self, config) -> bool:
        return True  # a last batch of one image cannot train the BatchNorms full fine-tuning re-estimates

    def criterion(self, config) -> None:
        return None  # the detector computes its losses

    def to_device(self, images, targets, device: torch.device):
        return images.to(device, non_blocking=True), [{k: v.to(device) for k, v in t.items()} for t in targets]

    def loss(self, net: nn.Module, images, targets, criterion) -> torch.Tensor:
        return sum(loss.float() for loss in net(list(images), targets).values())

    def count(self, targets) -> int:
        return len(targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, progress: bool = False, device: torch.device | None = None,
                 precision: str = "fp32", world: World = World()) -> dict:
        """COCO AP over ``loader`` (torchmetrics gathers the processes' detections)."""
        import contextlib
        import io

        from torchmetrics.detection import MeanAveragePrecision

        device = device or _default_device(model)
        model.eval()
        metric = MeanAveragePrecision(
            box_format="xyxy", iou_type=("bbox", "segm") if self.masks else ("bbox",), backend="pycocotools"
        )
        for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
            with autocast(device, precision):
                outputs = model(list(images.to(device, non_blocking=True)))
            metric.update([self._scored(o) for o in outputs], [self._truth(t) for t in targets])
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
            scores = metric.compute()
        row = {}
        for kind, name in (("bbox", "box"), ("segm", "mask"))[: 2 if self.masks else 1]:
            for suffix, key in (("map", "ap"), ("map_50", "ap50"), ("map_75", "ap75")):
                row[f"{name}_{key}"] = 100.0 * max(0.0, float(scores[f"{kind}_{suffix}"]))
        return row

    def _scored(self, output: dict) -> dict:
        scored = {k: output[k].detach().float().cpu() for k in ("boxes", "scores")}
        scored["labels"] = output["labels"].cpu()
        if self.masks:
            scored["masks"] = output["masks"][:, 0].cpu() > 0.5
        return scored

    def _truth(self, target: dict) -> dict:
        truth = {"boxes": target["boxes"].float().cpu(), "labels": target["labels"].cpu()}
        if self.masks:
            truth["masks"] = target["masks"].cpu().bool()
        return truth

    def summary(self, row: dict) -> str:
        text = f"val box AP {row['box_ap']:.2f}, AP50 {row['box_ap50']:.2f}, AP75 {row['box_ap75']:.2f}"
        if self.masks:
            text += f"; mask AP {row['mask_ap']:.2f}, AP50 {row['mask_ap50']:.2f}"
        return text


def objective_for(task: str, classes: list[str] | None = None):
    """The objective of ``task``; the dense tasks need the class names."""
    entry = get_task(task)
    if entry.segments:
        return SegmentationObjective(classes or [])
    if entry.detects:
        return DetectionObjective(classes or [], masks=entry.masks)
    return ClassificationObjective(len(classes) if classes else None)
