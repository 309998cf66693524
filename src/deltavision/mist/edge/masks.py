"""Segmentation data on the edge: the images to send to the service and the masks kept beside their features.

The service sees only images; the masks never leave the edge. The service
resizes every image to its input size S x S (bilinear) before the backbone,
and no augmentation can change what it computed, so the edge trains on those
fixed resized images: each mask is resized once to S x S with nearest
neighbour (the evaluation resize of :mod:`deltavision.data.segmentation`) and
stored in the feature cache next to the features
(:meth:`~.store.FeatureStore.write_masks`), so ``--offline`` runs need the
cache alone. mIoU is therefore measured at S x S.

The data are whatever :func:`deltavision.data.segmentation.build_segmentation_datasets`
reads (``fashion-scenes``, Pascal VOC, ADE20K or ``images/`` + ``masks/``
folders), split and checked exactly as there; files travel as they are on
disk, generated scenes as PNG.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from .client import ImageItem, encode_png, image_item
from .store import FeatureStore

MASKS_PER_SHARD = 256

MaskLoader = Callable[[], np.ndarray]


@dataclass(frozen=True)
class SegmentedImages:
    """Train/val images with a loader of each one's checked class-id mask (255 = ignore), by digest."""

    classes: list[str]
    train: list[ImageItem]
    val: list[ImageItem]
    masks: dict[str, MaskLoader]


def segmented_images(
    data: str | Path,
    *,
    val_fraction: float = 0.2,
    train_limit: int | None = None,
    val_limit: int | None = None,
    seed: int = 0,
) -> SegmentedImages:
    """The images and masks of a segmentation source, split as the main trainer splits them."""
    from ...data.segmentation import build_segmentation_datasets

    splits = build_segmentation_datasets(
        data, image_size=1, mean=0.0, std=1.0, val_fraction=val_fraction,
        train_limit=train_limit, val_limit=val_limit, augment=False, seed=seed,
    )  # fmt: skip
    masks: dict[str, MaskLoader] = {}
    train, val = _items_of(splits.train, masks), _items_of(splits.val, masks)
    return SegmentedImages(list(splits.classes), train, val, masks)


def _items_of(dataset, masks: dict[str, MaskLoader]) -> list[ImageItem]:
    """Items of a segmentation dataset; each one's mask loader goes into ``masks`` (first image wins)."""
    items = []
    if hasattr(dataset, "pairs"):  # files: the image as it is on disk, the mask read and checked when needed
        for index, (image_path, _) in enumerate(dataset.pairs):
            item = image_item(-1, path=image_path)
            masks.setdefault(item.digest, lambda index=index: dataset.load(index)[1])
            items.append(item)
        return items
    for pixels, mask in zip(dataset.images, dataset.masks):
        item = image_item(-1, encoded=encode_png(np.ascontiguousarray(pixels)))
        masks.setdefault(item.digest, lambda mask=mask: mask)
        items.append(item)
    return items


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """An H x W class-id mask as uint8 ``size`` x ``size``, nearest neighbour (labels are never blended)."""
    resized = TF.resize(tv_tensors.Mask(torch.from_numpy(np.asarray(mask, dtype=np.uint8))[None]), [size, size])
    return resized[0].as_subclass(torch.Tensor).to(torch.uint8)


def store_masks(
    store: FeatureStore, images: SegmentedImages, digests: Sequence[str], size: int, progress: bool = True
) -> int:
    """Resize and store the masks of ``digests`` the store lacks (damaged shards are redone); returns how many."""
    store.discard_damaged_masks(size)
    todo = store.missing_masks(digests, size)
    with tqdm(total=len(todo), desc=f"masks {size}x{size}", unit="mask", disable=not progress) as bar:
        for start in range(0, len(todo), MASKS_PER_SHARD):
            chunk = todo[start : start + MASKS_PER_SHARD]
            store.write_masks(size, chunk, torch.stack([resize_mask(images.masks[h](), size) for h in chunk]))
            bar.update(len(chunk))
    return len(todo)
