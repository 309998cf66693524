"""Semantic segmentation datasets: image + integer mask pairs with 255 as the ignore label.

Sources:

- ``fashion-scenes``: the embedded offline default, a COMPOSITE of real images (real
  Fashion-MNIST items pasted onto crops of real sample photos), see :mod:`deltavision.data.scenes`.
- A folder, its layout detected from its contents:

  - Pascal VOC: ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs whose index is the class,
    255 = ignore) and ``ImageSets/Segmentation/{train,val}.txt``; the 21 VOC classes. The folder
    may also be the one holding ``VOCdevkit/VOC2012/``.
  - ADE20K: ``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png``;
    label 0 is "other" and is ignored, the rest shift down by one (mmseg's reduce-zero-label);
    150 classes named by ``classes.txt`` if present.
  - Generic: ``images/`` + ``masks/`` (same file stem, mask a PNG of class ids, 255 = ignore) and
    ``classes.txt`` (one name per line); split by ``val_fraction`` unless both folders have
    ``train/`` and ``val/`` subfolders.

Every item is ``(image 3 x S x S float normalised, mask S x S int64)``. Training augmentation
(torchvision transforms v2, image and mask together): random resize to 0.5-2x ``image_size``,
random crop to ``image_size`` (mask padded with 255) and horizontal flip; evaluation resizes to
``image_size`` (the mask with nearest neighbour). A mask whose size differs from its image, a
label beyond the class count, or a missing mask raises :class:`DataError` naming the file.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from deltavision.data.images import DECODE_ERRORS, is_image_file, load_rgb_image
from deltavision.data.scenes import SCENE_CLASSES, SCENE_SIZE, TRAIN_SCENES, VAL_SCENES, load_scenes
from deltavision.data.transforms import _channel_stats
from deltavision.errors import DataError

IGNORE_INDEX = 255
RESIZE_SCALE = (0.5, 2.0)
FASHION_SCENES = "fashion-scenes"
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]  # fmt: skip
ADE20K_CLASS_COUNT = 150
SPLIT_FOLDERS = {"voc": ("train", "val"), "ade20k": ("training", "validation"), "generic": ("train", "val")}

LabelMap = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SegmentationSplits:
    """Train and val segmentation datasets, their class names and the ignored label value."""

    train: Dataset
    val: Dataset
    classes: list[str]
    ignore_index: int = IGNORE_INDEX


# --- transforms ---------------------------------------------------------------------------------


def _to_normalised(mean: float | Sequence[float], std: float | Sequence[float]) -> list[v2.Transform]:
    """Image to float in [0, 1] then normalised; the mask untouched."""
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(_channel_stats(mean), _channel_stats(std)),
    ]


def make_segmentation_transforms(image_size: int, mean, std, augment: bool) -> tuple[v2.Compose, v2.Compose]:
    """``(train_tf, eval_tf)`` applied jointly to a ``tv_tensors.Image`` and its ``tv_tensors.Mask``."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    eval_tf = v2.Compose([v2.Resize((image_size, image_size), antialias=True), *_to_normalised(mean, std)])
    if not augment:
        return eval_tf, eval_tf
    low, high = (round(image_size * scale) for scale in RESIZE_SCALE)
    train_tf = v2.Compose([
        v2.RandomResize(low, high + 1, antialias=True),
        v2.RandomCrop(image_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(),
        *_to_normalised(mean, std),
    ])  # fmt: skip
    return train_tf, eval_tf


def _apply(transform: v2.Compose, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``transform`` on a uint8 3 x H x W image and H x W mask; return plain tensors (mask int64)."""
    image, mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).to(torch.int64)


# --- datasets -----------------------------------------------------------------------------------


class ArraySegmentationDataset(Dataset):
    """Segmentation items from in-memory uint8 images (N x H x W x 3) and masks (N x H x W)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, transform: v2.Compose):
        self.images, self.masks, self.transform = images, masks, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)
        return _apply(self.transform, image, torch.from_numpy(self.masks[index].astype(np.int64)))


class FileSegmentationDataset(Dataset):
    """Segmentation items read from ``(image path, mask path)`` pairs.

    ``label_map`` turns a raw mask into class ids (255 = ignore); ids at or above ``num_classes``
    other than 255, and masks whose size differs from their image, raise DataError naming the file.
    """

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        num_classes: int,
        transform: v2.Compose,
        label_map: LabelMap | None = None,
    ):
        self.pairs, self.num_classes, self.transform, self.label_map = pairs, num_classes, transform, label_map

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The raw RGB image and its checked class-id mask (uint8, 255 = ignore)."""
        image_path, mask_path = self.pairs[index]
        image = load_rgb_image(image_path)
        mask = read_mask(mask_path)
        if mask.shape != (image.height, image.width):
            raise DataError(
                f"Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} px "
                f"but its image {image_path} is {image.width}x{image.height} px."
            )
        if self.label_map is not None:
            mask = self.label_map(mask)
        check_labels(mask, self.num_classes, mask_path)
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        return _apply(self.transform, pil_to_tensor(image), torch.from_numpy(mask.astype(np.int64)))


def read_mask(path: Path) -> np.ndarray:
    """A single-channel mask file (palette or grey) as an H x W uint8 array of raw label values."""
    if not path.is_file():
        raise DataError(f"Mask file {path} is missing; every image needs a mask with the same name.")
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("P", "L"):
                raise DataError(
                    f"Mask {path} is a {mask.mode} image; save masks as palette (P) or grey (L) PNGs of class ids."
                )
            return np.array(mask)
    except DECODE_ERRORS as error:
        raise DataError(f"Cannot read mask {path} ({error}); replace or delete the file.") from error


def check_labels(mask: np.ndarray, num_classes: int, path: Path) -> None:
    """Raise DataError naming ``path`` if ``mask`` holds a label >= ``num_classes`` other than 255."""
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        raise DataError(
            f"Mask {path} has label {int(mask[bad].max())} but there are only {num_classes} classes "
            f"(0..{num_classes - 1}, 255 = ignore)."
        )


def reduce_zero_label(mask: np.ndarray) -> np.ndarray:
    """ADE20K labels as mmseg reads them: 0 ("other") and 255 become 255 (ignore), the rest go down by one."""
    ignored = (mask == 0) | (mask == IGNORE_INDEX)
    return np.where(ignored, IGNORE_INDEX, mask.astype(np.int64) - 1).astype(np.uint8)


# --- layouts ------------------------------------------------------------------------------------


def unwrap_voc(root: Path) -> Path:
    """``root/VOCdevkit/VOC20xx`` (or ``root/VOC20xx``) when ``root`` is the folder a VOC archive extracts into."""
    if (root / "JPEGImages").is_dir():
        return root
    nested = sorted(root.glob("VOCdevkit/VOC*/JPEGImages")) + sorted(root.glob("VOC*/JPEGImages"))
    return nested[-1].parent if nested else root


def detect_layout(root: Path) -> str:
    """"voc", "ade20k" or "generic" from the folders under ``root``; DataError if none fits."""
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        return "voc"
    if (root / "images" / "training").is_dir() and (root / "annotations" / "training").is_dir():
        return "ade20k"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "generic"
    raise DataError(
        f"{root} is not a segmentation dataset: expected JPEGImages/ + SegmentationClass/ (Pascal VOC), "
        "images/training/ + annotations/training/ (ADE20K), or images/ + masks/ + classes.txt."
    )


def read_class_names(path: Path) -> list[str]:
    """Class names from a text file, one per non-empty line."""
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"Cannot read class names from {path} ({error}).") from error
    if not names:
        raise DataError(f"{path} lists no class names; write one name per line.")
    return names


def _pair_with_masks(images: list[Path], mask_folder: Path) -> list[tuple[Path, Path]]:
    """Each image with ``mask_folder/<stem>.png``; DataError naming the first image without one."""
    pairs = [(image, mask_folder / f"{image.stem}.png") for image in images]
    for image, mask in pairs:
        if not mask.is_file():
            raise DataError(f"Mask file {mask} for image {image} is missing.")
    return pairs


def _image_files(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted."""
    if not folder.is_dir():
        raise DataError(f"Image folder {folder} is missing.")
    return sorted(path for path in folder.iterdir() if is_image_file(path))


def _folder_pairs(root: Path, image_folder: str, mask_folder: str, split: str = "") -> list[tuple[Path, Path]]:
    """The images in ``root/image_folder/split`` paired with the PNG masks in ``root/mask_folder/split``."""
    return _pair_with_masks(_image_files(root / image_folder / split), root / mask_folder / split)


def _voc_split(root: Path, split: str) -> list[tuple[Path, Path]]:
    """The VOC pairs listed in ``ImageSets/Segmentation/<split>.txt``."""
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"Pascal VOC split file {listing} is missing.")
    names = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    images = [root / "JPEGImages" / f"{name}.jpg" for name in names]
    for image in images:
        if not image.is_file():
            raise DataError(f"Image {image} listed in {listing} is missing.")
    return _pair_with_masks(images, root / "SegmentationClass")


def _split_pairs(pairs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random split of ``pairs`` into train and val (val gets ``val_fraction``, at least one)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if len(pairs) < 2:
        raise DataError(f"Need at least two image/mask pairs to split into train and val, found {len(pairs)}.")
    order = np.random.default_rng(seed).permutation(len(pairs))
    val_count = min(len(pairs) - 1, max(1, round(len(pairs) * val_fraction)))
    return [pairs[i] for i in sorted(order[val_count:])], [pairs[i] for i in sorted(order[:val_count])]


def _generic_pairs(root: Path, val_fraction: float, seed: int) -> tuple[list, list]:
    """Train and val pairs of the generic layout (``train/``/``val/`` subfolders, else a random split)."""
    if all((root / folder / split).is_dir() for folder in ("images", "masks") for split in ("train", "val")):
        return tuple(_folder_pairs(root, "images", "masks", split) for split in SPLIT_FOLDERS["generic"])
    return _split_pairs(_folder_pairs(root, "images", "masks"), val_fraction, seed)


def _ade20k_classes(root: Path) -> list[str]:
    """ADE20K's class names from ``root/classes.txt``, else ``class_0`` .. ``class_149``."""
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        return read_class_names(classes_file)
    return [f"class_{index}" for index in range(ADE20K_CLASS_COUNT)]


def scan_segmentation_folder(root: Path, val_fraction: float = 0.2, seed: int = 0):
    """``(train pairs, val pairs, classes, label_map)`` of the dataset in ``root`` (layout detected)."""
    layout = detect_layout(root)
    if layout == "voc":
        return (*(_voc_split(root, split) for split in SPLIT_FOLDERS["voc"]), list(VOC_CLASSES), None)
    if layout == "ade20k":
        splits = (_folder_pairs(root, "images", "annotations", split) for split in SPLIT_FOLDERS["ade20k"])
        return (*splits, _ade20k_classes(root), reduce_zero_label)
    classes_file = root / "classes.txt"
    if not classes_file.is_file():
        raise DataError(f"{classes_file} is missing; list the class names, one per line, in mask-id order.")
    return (*_generic_pairs(root, val_fraction, seed), read_class_names(classes_file), None)


# --- entry point --------------------------------------------------------------------------------


def _limit(pairs: list, limit: int | None, seed: int) -> list:
    """A seeded random subset of ``limit`` pairs (in their original order), or all of them."""
    if limit is None or limit >= len(pairs):
        return pairs
    keep = np.sort(np.random.default_rng(seed).permutation(len(pairs))[:limit])
    return [pairs[i] for i in keep]


def is_fashion_scenes(source: str | Path) -> bool:
    """True when ``source`` names the embedded fashion-scenes dataset (case and _/- insensitive)."""
    return str(source).strip().lower().replace("_", "-") == FASHION_SCENES


def _scene_dataset(split: str, count: int, seed: int, transform: v2.Compose) -> ArraySegmentationDataset:
    """``count`` fashion-scenes of ``split`` (128 px, cached) as a segmentation dataset."""
    scenes = load_scenes(split, count, SCENE_SIZE, seed)
    return ArraySegmentationDataset(scenes.images, scenes.semantic_masks(), transform)


def _fashion_scenes_splits(train_tf, eval_tf, train_limit: int | None, val_limit: int | None, seed: int):
    """fashion-scenes with ``train_limit``/``val_limit`` scenes (default 1000/200)."""
    train = _scene_dataset("train", train_limit or TRAIN_SCENES, seed, train_tf)
    val = _scene_dataset("val", val_limit or VAL_SCENES, seed, eval_tf)
    return SegmentationSplits(train, val, list(SCENE_CLASSES))


def build_segmentation_datasets(
    source: str | Path,
    image_size: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    *,
    val_fraction: float = 0.2,
    train_limit: int | None = None,
    val_limit: int | None = None,
    augment: bool = True,
    seed: int = 0,
) -> SegmentationSplits:
    """Train and val segmentation datasets from ``fashion-scenes`` or a VOC / ADE20K / generic folder.

    For fashion-scenes the limits are the number of scenes generated (default 1000 train, 200 val)
    and ``val_fraction`` is unused (val scenes use Fashion-MNIST's test items). For folders the
    limits take a seeded random subset.
    """
    train_tf, eval_tf = make_segmentation_transforms(image_size, mean, std, augment)
    if is_fashion_scenes(source):
        return _fashion_scenes_splits(train_tf, eval_tf, train_limit, val_limit, seed)
    root = Path(source).expanduser()
    if not root.is_dir():
        raise DataError(f"Segmentation source {source} is neither {FASHION_SCENES!r} nor a folder.")
    train_pairs, val_pairs, classes, label_map = scan_segmentation_folder(unwrap_voc(root), val_fraction, seed)
    train = FileSegmentationDataset(_limit(train_pairs, train_limit, seed), len(classes), train_tf, label_map)
    val = FileSegmentationDataset(_limit(val_pairs, val_limit, seed), len(classes), eval_tf, label_map)
    return SegmentationSplits(train, val, classes)
