"""The segmentation variants of the edge commands: fit, evaluate and predict masks.

:mod:`.commands` dispatches here when ``task="segmentation"``. Fitting trains the
LAE with a segmentation decoder through the main training loop (``log.csv`` with
mIoU per epoch in the output folder) on the masks kept in the feature cache
(:mod:`.masks`), choosing k by val mIoU; evaluation reports mIoU, pixel accuracy
and IoU per class; prediction writes one palette PNG mask per image, at the
image's size. A segmentation manifest lists its images by digest alone
(:func:`digest_rows`, checked by :func:`digest_row_problem`), and an offline run
needs the cached masks beside the features (:func:`require_masks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ...errors import AdapterFileError, DeltaVisionError
from ...model.state import count_parameters
from .client import RETRY_SECONDS, ImageItem, connected, image_files, request_batches
from .fit import (
    FitConfig,
    MaskedFeatureSet,
    evaluate_segmentation_edge,
    miou_after_training,
    select_k,
    train_segmentation_edge,
)
from .network import SegmentationEdgeNetwork, load_edge
from .store import FeatureStore


def fit_segmentation(
    store: FeatureStore,
    manifest: dict[str, Any],
    ks: list[int],
    make_model: Callable[[int], SegmentationEdgeNetwork],
    fit: FitConfig,
    dtype: str,
    out: Path,
):
    """(trained segmentation edge network, summary); k chosen by val mIoU; log.csv in ``out``."""
    splits = _masked_splits_reader(store, manifest, dtype)
    k_scores: dict[int, float] = {}
    best = ks[0]
    if len(ks) > 1:
        best, k_scores = select_k(ks, make_model, splits, fit, score=miou_after_training)
    torch.manual_seed(fit.seed)
    model = make_model(best)
    train_set, val = splits(best)
    history = [_json_safe(row) for row in train_segmentation_edge(model, train_set, val, fit, Path(out))]
    summary = {
        "task": "segmentation",
        "k": best,
        "k_scores": {str(k): v for k, v in k_scores.items()},
        "miou": history[-1]["miou"],
        "pixel_acc": history[-1]["pixel_acc"],
        "trainable_parameters": count_parameters(model)["trainable"],
        "train_images": len(train_set),
        "val_images": len(val),
        "dtype": dtype,
        "history": history,
    }
    return model, summary


def evaluate_segmentation(
    model: SegmentationEdgeNetwork, store: FeatureStore, digests: list[str], batch_size: int
) -> dict[str, Any]:
    """mIoU, pixel accuracy and ``iou/<class>`` of ``model`` on the cached features and masks of
    ``digests`` (their features must be cached already); ``images`` counts them."""
    config = model.config
    require_masks(store, digests, config.image_size)
    shape = (config.tokens, config.width)
    masked = MaskedFeatureSet(store, config.k, config.dtype, digests, config.image_size, config.num_classes, shape)
    return {**_json_safe(evaluate_segmentation_edge(model, masked, max(1, batch_size // 2))), "images": len(digests)}


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """A history row with NaN (the IoU of a class absent from val and predictions) as None."""
    return {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in row.items()}


def predict_masks(
    model_dir: Path, paths: list[Path], out: Path, *, server: str, token: str | None,
    retry_seconds: float = RETRY_SECONDS,
) -> list[dict[str, Any]]:
    """One palette PNG mask per image file in ``out`` (``<stem>.png``, at the image's size), from a
    segmentation edge network; returns, per image, the mask written and the classes it shows."""
    from ...io import ensure_writable_dir

    model = load_edge(model_dir)
    config = model.config
    if config.task != "segmentation":
        raise DeltaVisionError(f"{model_dir} holds a {config.task} edge model; it predicts labels, not masks")
    items = image_files(paths)
    ensure_writable_dir(Path(out))
    names = _mask_names(items)
    results = []
    with connected(server, token, config, retry_seconds) as client:
        start = 0
        for batch in request_batches(items, client.info()["limits"]):
            payload = client.features(batch, [config.k], config.dtype)
            with torch.no_grad():
                logits = model(payload.as_float32(config.k))
            for offset, item_logits in enumerate(logits):
                item = items[start + offset]
                mask = _mask_at_image_size(item_logits, item.path)
                target = Path(out) / names[start + offset]
                write_palette_mask(mask, target)
                present = [config.classes[c] for c in np.unique(mask)]
                results.append({"image": str(item.path), "mask": str(target), "classes": present})
            start += len(batch)
    return results


def _mask_names(items: list[ImageItem]) -> list[str]:
    """``<stem>.png`` per image, numbered when two images share a stem."""
    names, seen = [], set()
    for item in items:
        name, number = f"{item.path.stem}.png", 1
        while name in seen:
            number += 1
            name = f"{item.path.stem}-{number}.png"
        seen.add(name)
        names.append(name)
    return names


def _mask_at_image_size(logits: torch.Tensor, path: Path) -> np.ndarray:
    """Class ids (uint8) of one image's (classes, S, S) logits, resized to the upright image's size."""
    from ...data.images import load_rgb_image

    width, height = load_rgb_image(path).size
    resized = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)
    return resized[0].argmax(dim=0).to(torch.uint8).numpy()


def voc_palette() -> list[int]:
    """The Pascal VOC colour map (256 RGB triples, flattened), the colours of its mask PNGs; 255 is white."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        code = index
        for bit in range(8):
            red |= ((code >> 0) & 1) << (7 - bit)
            green |= ((code >> 1) & 1) << (7 - bit)
            blue |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette += [red, green, blue]
    palette[255 * 3 : 256 * 3] = [255, 255, 255]
    return palette


def write_palette_mask(mask: np.ndarray, path: Path) -> None:
    """``mask`` (H x W class ids) as a palette PNG: pixel values are the ids, colours VOC's."""
    from PIL import Image

    from ...io import atomic_write

    image = Image.fromarray(mask, mode="P")
    image.putpalette(voc_palette())
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))


# --- the segmentation manifest and cache --------------------------------------------------------


def digest_rows(items: list[ImageItem]) -> list[str]:
    """The manifest rows of segmentation images: their digests (the masks stay in the cache)."""
    return [item.digest for item in items]


def digest_row_problem(row: Any, split: str) -> str | None:
    """What is wrong with a segmentation manifest row, or None."""
    return None if isinstance(row, str) and row else f"a {split} entry {str(row)[:60]} is not an image digest"


def require_masks(store: FeatureStore, digests: list[str], size: int) -> None:
    """Refuse (AdapterFileError) a cache that lacks the ``size`` x ``size`` mask of any of ``digests``."""
    absent = store.missing_masks(digests, size)
    if absent:
        damaged = store.damaged_masks(size)
        why = f" ({len(damaged)} shard(s) fail their checksum)" if damaged else ""
        raise AdapterFileError(
            f"the feature cache {store.folder} lacks the {size} x {size} masks of {len(absent)} image(s){why}; "
            "run without --offline to store them again"
        )


def _masked_splits_reader(store: FeatureStore, manifest: dict[str, Any], dtype: str):
    """k -> (train, val) :class:`MaskedFeatureSet` of a segmentation manifest (whose rows are digests)."""
    shape = tuple(manifest["service"]["feature_shape"])
    size, classes = manifest["service"]["image_size"], len(manifest["classes"])

    def splits(k: int) -> tuple[MaskedFeatureSet, MaskedFeatureSet]:
        return tuple(
            MaskedFeatureSet(store, k, dtype, list(manifest[split]), size, classes, shape)
            for split in ("train", "val")
        )

    return splits
