"""``fashion-scenes``: an offline segmentation (and detection) dataset composited from real images.

Every scene is a COMPOSITE, not a photograph of a real scene: a random crop of one of the real
sample photos shipped with scikit-image and scikit-learn (astronaut, coffee, chelsea, rocket,
china, flower, ...) with a few real Fashion-MNIST items (grey, 28 px, scaled 2-4x) pasted at
random positions. Only the item pixels brighter than :data:`ITEM_THRESHOLD` are pasted, so those
pixels are the item's exact mask; its class is its Fashion-MNIST class + 1 (0 = background, 11
classes). Later items occlude earlier ones; each item's visible pixels form its instance mask,
and boxes are derived from the instance masks (for a future detection task).

Train scenes use Fashion-MNIST training items, val scenes its official test items. Scene ``i``
of a split depends only on ``(seed, split, i)`` and the generation parameters, so scenes are
deterministic and a larger count extends a smaller one. Generated scenes are cached as one .npz
per split under :func:`deltavision.paths.cache_dir`, keyed by the generation parameters.
"""

import hashlib
import json
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import masks_to_boxes

from deltavision.data.bundled import FASHION_MNIST_CLASSES, load_fashion_mnist
from deltavision.io import atomic_write
from deltavision.paths import cache_dir

SCENE_CLASSES = ["background", *FASHION_MNIST_CLASSES]
SCENE_SIZE = 128
TRAIN_SCENES = 1000
VAL_SCENES = 200
ITEMS_PER_SCENE = (2, 4)  # inclusive range
ITEM_SCALE = (2.0, 4.0)
ITEM_SIDE = 28
ITEM_THRESHOLD = 64  # item pixels above this grey level are pasted and form the mask
SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field",
    "immunohistochemistry", "coins", "moon", "brick", "grass", "gravel",
)  # fmt: skip
SPLIT_CODES = {"train": 0, "val": 1}
FORMAT_VERSION = 1
SCENE_FIELDS = ("images", "instance_map", "instance_labels")


@dataclass(frozen=True)
class SceneArrays:
    """One split of generated scenes.

    ``images`` is N x S x S x 3 uint8; ``instance_map`` is N x S x S uint8 with 0 = background and
    k = the k-th pasted item of that scene (visible pixels only); ``instance_labels`` is
    N x (max items + 1) int64 mapping instance id to class (entry 0 is background, 0).
    """

    images: np.ndarray
    instance_map: np.ndarray
    instance_labels: np.ndarray

    def semantic_masks(self) -> np.ndarray:
        """N x S x S uint8 class masks (0 = background, Fashion-MNIST class + 1 for items)."""
        rows = np.arange(len(self.images))[:, None, None]
        return self.instance_labels[rows, self.instance_map].astype(np.uint8)

    def instances(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scene ``index``'s visible items as ``(masks K x S x S bool, labels K int64, boxes K x 4 xyxy)``."""
        instance_map = torch.from_numpy(self.instance_map[index])
        ids = instance_map.unique()
        ids = ids[ids != 0]
        masks = instance_map[None] == ids[:, None, None].to(instance_map.dtype)
        labels = torch.from_numpy(self.instance_labels[index])[ids.long()]
        return masks, labels, masks_to_boxes(masks)


@lru_cache(maxsize=1)
def background_photos() -> tuple[np.ndarray, ...]:
    """The real sample photos shipped with scikit-image and scikit-learn, as H x W x 3 uint8."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    photos += list(load_sample_images().images)
    return tuple(np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p[..., :3] for p in photos)


def random_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of a random photo, resized to ``size`` (crop side from ``size`` to the short side)."""
    photos = background_photos()
    photo = photos[rng.integers(len(photos))]
    short = min(photo.shape[:2])
    side = int(rng.integers(min(size, short), short + 1))
    top = int(rng.integers(photo.shape[0] - side + 1))
    left = int(rng.integers(photo.shape[1] - side + 1))
    crop = Image.fromarray(np.ascontiguousarray(photo[top : top + side, left : left + side]))
    return np.array(crop.resize((size, size), Image.BILINEAR))


def scale_item(item: np.ndarray, side: int) -> np.ndarray:
    """A 28 px grey Fashion-MNIST item resized to ``side`` px (bilinear)."""
    return np.array(Image.fromarray(item).resize((side, side), Image.BILINEAR))


def paste_item(
    image: np.ndarray, instance_map: np.ndarray, item: np.ndarray, instance_id: int, top: int, left: int
) -> None:
    """Paste the grey ``item``'s pixels above the threshold into ``image`` in place; mark them ``instance_id``."""
    bright = item > ITEM_THRESHOLD
    rows, cols = slice(top, top + item.shape[0]), slice(left, left + item.shape[1])
    image[rows, cols][bright] = item[bright, None]
    instance_map[rows, cols][bright] = instance_id


def compose_scene(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, size: int):
    """One scene: ``(image S x S x 3, instance_map S x S, instance_labels)`` from items drawn with ``rng``."""
    image = random_background(rng, size)
    instance_map = np.zeros((size, size), dtype=np.uint8)
    instance_labels = np.zeros(ITEMS_PER_SCENE[1] + 1, dtype=np.int64)
    for instance_id in range(1, int(rng.integers(ITEMS_PER_SCENE[0], ITEMS_PER_SCENE[1] + 1)) + 1):
        pick = int(rng.integers(len(items)))
        side = min(size, round(ITEM_SIDE * rng.uniform(*ITEM_SCALE)))
        top, left = (int(value) for value in rng.integers(size - side + 1, size=2))
        paste_item(image, instance_map, scale_item(items[pick], side), instance_id, top, left)
        instance_labels[instance_id] = labels[pick] + 1
    return image, instance_map, instance_labels


@lru_cache(maxsize=1)
def _fashion_mnist():
    """Fashion-MNIST, read once per process (generating both splits would otherwise read it twice)."""
    return load_fashion_mnist()


def _split_items(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST items and labels for ``split``: the training set for "train", the test set for "val"."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    data = _fashion_mnist()
    return (data.images, data.labels) if split == "train" else (data.val_images, data.val_labels)


def generate_scenes(split: str, count: int, size: int = SCENE_SIZE, seed: int = 0) -> SceneArrays:
    """Generate ``count`` scenes of ``split``; scene ``i`` depends only on ``(seed, split, i)``."""
    items, labels = _split_items(split)
    images = np.zeros((count, size, size, 3), dtype=np.uint8)
    maps = np.zeros((count, size, size), dtype=np.uint8)
    table = np.zeros((count, ITEMS_PER_SCENE[1] + 1), dtype=np.int64)
    for index in range(count):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
        images[index], maps[index], table[index] = compose_scene(rng, items, labels, size)
    return SceneArrays(images, maps, table)


def cache_path(split: str, count: int, size: int, seed: int) -> Path:
    """The cache file for these generation parameters (a hash of all of them in the name)."""
    params = {
        "split": split, "count": count, "size": size, "seed": seed, "items": ITEMS_PER_SCENE, "scale": ITEM_SCALE,
        "threshold": ITEM_THRESHOLD, "photos": SKIMAGE_PHOTOS, "version": FORMAT_VERSION,
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "fashion-scenes" / f"{split}-{count}x{size}-seed{seed}-{key}.npz"


def _write_npz(path: Path, scenes: SceneArrays) -> None:
    """Save ``scenes`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as stream:
            np.savez(stream, **{name: getattr(scenes, name) for name in SCENE_FIELDS})

    atomic_write(path, write)


def _read_npz(path: Path) -> SceneArrays | None:
    """Scenes from a cache file, or None if it is missing or unreadable."""
    try:
        with np.load(path) as archive:
            return SceneArrays(*(archive[name] for name in SCENE_FIELDS))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def load_scenes(split: str, count: int, size: int = SCENE_SIZE, seed: int = 0) -> SceneArrays:
    """The ``split`` scenes from the cache, generating and caching them on the first call."""
    path = cache_path(split, count, size, seed)
    cached = _read_npz(path) if path.is_file() else None
    if cached is not None:
        return cached
    scenes = generate_scenes(split, count, size, seed)
    _write_npz(path, scenes)
    return scenes
