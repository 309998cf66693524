"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU and pixel accuracy.

IoU_c = TP_c / (TP_c + FP_c + FN_c); mIoU averages the classes that occur in
the targets or predictions (mmseg's convention: a class absent from both has
no IoU). Pixels labelled ``ignore_index`` are not counted.
"""

from __future__ import annotations

import torch


class ConfusionMatrix:
    """Accumulates ``counts[target, prediction]`` over batches."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu"):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        keep = targets != self.ignore_index
        pairs = targets[keep].long() * self.num_classes + predictions[keep].long()
        self.counts += torch.bincount(pairs, minlength=self.num_classes ** 2).view(self.num_classes, -1)

    def per_class_iou(self) -> list[float | None]:
        """IoU of each class in percent; None for a class absent from targets and predictions."""
        counts = self.counts.double()
        hits = counts.diag()
        union = counts.sum(0) + counts.sum(1) - hits
        return [None if u == 0 else 100.0 * float(h / u) for h, u in zip(hits, union)]

    def mean_iou(self) -> float:
        present = [iou for iou in self.per_class_iou() if iou is not None]
        return sum(present) / len(present) if present else 0.0

    def pixel_accuracy(self) -> float:
        total = int(self.counts.sum())
        return 100.0 * int(self.counts.diag().sum()) / total if total else 0.0
