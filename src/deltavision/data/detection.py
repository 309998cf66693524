"""Detection and instance-segmentation datasets: images with boxes, labels and (for instances) masks.

Sources:

- ``fashion-scenes``: the embedded offline default, a COMPOSITE of real images (real
  Fashion-MNIST items pasted onto crops of real sample photos, :mod:`deltavision.data.scenes`);
  each visible item is an instance with its exact pixel mask and the box around it.
- A COCO folder: ``annotations/instances_<split>.json`` (``train*`` and ``val*``; a single file
  is split by ``val_fraction``) with the images in ``<split>/``, ``images/<split>/`` or
  ``images/``. Read with pycocotools; polygons and RLE become masks. Crowd annotations
  (``iscrowd=1``) are skipped with a warning that counts them, as COCO training does.
- A Pascal VOC folder: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/{train,val}.txt``
  (boxes only, so ``detection`` not ``instance``); the 20 VOC classes.

Every item is ``(image 3 x S x S float in [0, 1], target)`` with ``target`` holding ``boxes``
(K x 4 float, xyxy pixels), ``labels`` (K int64, 1..classes-1; 0 is the background) and for
instances ``masks`` (K x S x S uint8). ``classes[0]`` is always "background". Images are
resized to S x S (torchvision transforms v2 move boxes and masks with them); training adds a
random 0.8-1.25x rescale, an S x S crop and a horizontal flip, dropping boxes cut to nothing.
Boxes reaching outside their image, degenerate boxes, unknown categories and missing images
raise :class:`DataError` naming the file and the annotation.
"""

from __future__ import annotations

import contextlib
import io
import warnings
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from deltavision.data.images import load_rgb_image
from deltavision.data.scenes import SCENE_CLASSES, SCENE_SIZE, TRAIN_SCENES, VAL_SCENES, SceneArrays, load_scenes
from deltavision.data.segmentation import VOC_CLASSES, _limit, _split_pairs, is_fashion_scenes, unwrap_voc
from deltavision.errors import DataError

RESCALE = (0.8, 1.25)
EDGE_TOLERANCE = 1.0  # px a box may reach past the image edge (rounding in annotation tools)


@dataclass(frozen=True)
class DetectionSplits:
    """Train and val detection datasets and their class names ("background" first)."""

    train: Dataset
    val: Dataset
    classes: list[str]


@dataclass(frozen=True)
class Annotated:
    """One image's annotations before loading: the file, its size and its objects."""

    image: Path
    width: int
    height: int
    boxes: np.ndarray  # K x 4 float xyxy
    labels: np.ndarray  # K int64
    source: str = ""  # the annotation file, for messages
    coco_ids: tuple[int, ...] = ()  # COCO annotation ids (masks are decoded from them on load)
    coco: object = field(default=None, compare=False, repr=False)  # the pycocotools index holding them


# --- transforms ---------------------------------------------------------------------------------


def make_detection_transforms(image_size: int, augment: bool) -> tuple[v2.Compose, v2.Compose]:
    """``(train_tf, eval_tf)`` on an image and its target dict (boxes, labels, masks move together)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    to_float = v2.ToDtype(torch.float32, scale=True)  # images only; boxes and masks keep their types
    eval_tf = v2.Compose([v2.Resize((image_size, image_size), antialias=True), to_float])
    if not augment:
        return eval_tf, eval_tf
    low, high = (round(image_size * scale) for scale in RESCALE)
    train_tf = v2.Compose([
        v2.Resize((image_size, image_size), antialias=True),
        v2.RandomResize(low, high + 1, antialias=True),
        v2.RandomCrop(image_size, pad_if_needed=True),
        v2.RandomHorizontalFlip(),
        v2.SanitizeBoundingBoxes(min_size=1.0),
        to_float,
    ])  # fmt: skip
    return train_tf, eval_tf


def apply_detection_transform(transform: v2.Compose, image: torch.Tensor, boxes: torch.Tensor,
                              labels: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """``transform`` on a uint8 3 x H x W image with its boxes (xyxy), labels and optional K x H x W masks."""
    size = tuple(image.shape[-2:])
    target = {"boxes": tv_tensors.BoundingBoxes(boxes.float().reshape(-1, 4), format="XYXY", canvas_size=size),
              "labels": labels.long()}
    if masks is not None:
        target["masks"] = tv_tensors.Mask(masks.to(torch.uint8).reshape(-1, *size))
    image, target = transform(tv_tensors.Image(image), target)
    return image.as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) for k, v in target.items()}


# --- datasets -----------------------------------------------------------------------------------


class SceneDetectionDataset(Dataset):
    """fashion-scenes items as instances: every visible pasted item's box, class and (``masks``) mask."""

    def __init__(self, scenes: SceneArrays, transform: v2.Compose, masks: bool):
        self.scenes, self.transform, self.masks = scenes, transform, masks

    def __len__(self) -> int:
        return len(self.scenes.images)

    def __getitem__(self, index: int):
        image = torch.from_numpy(np.ascontiguousarray(self.scenes.images[index])).permute(2, 0, 1)
        masks, labels, boxes = self.scenes.instances(index)
        boxes = boxes + torch.tensor([0.0, 0.0, 1.0, 1.0])  # masks_to_boxes gives the last pixel; boxes end past it
        return apply_detection_transform(self.transform, image, boxes, labels, masks if self.masks else None)


class AnnotatedDetectionDataset(Dataset):
    """Items from checked :class:`Annotated` records; COCO masks decoded with pycocotools on load."""

    def __init__(self, records: list[Annotated], transform: v2.Compose, masks: bool = False):
        self.records, self.transform, self.masks = records, transform, masks

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        if not record.image.is_file():
            raise DataError(f"Image {record.image} named in {record.source} is missing.")
        picture = load_rgb_image(record.image)
        if (picture.width, picture.height) != (record.width, record.height):
            raise DataError(
                f"Image {record.image} is {picture.width}x{picture.height} px but {record.source} "
                f"says {record.width}x{record.height}; its boxes would be misplaced."
            )
        masks = None
        if self.masks:
            coco = record.coco
            masks = torch.from_numpy(np.stack([coco.annToMask(coco.anns[i]) for i in record.coco_ids])
                                     if record.coco_ids else np.zeros((0, record.height, record.width), np.uint8))
        return apply_detection_transform(self.transform, pil_to_tensor(picture), torch.from_numpy(record.boxes),
                                         torch.from_numpy(record.labels), masks)


# --- checks -------------------------------------------------------------------------------------


def check_box(box: list[float], width: int, height: int, where: str) -> None:
    """DataError naming ``where`` if the xyxy ``box`` is degenerate or reaches outside the image."""
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise DataError(f"{where}: degenerate box {_fmt(box)} (x2 <= x1 or y2 <= y1; xyxy pixels).")
    if x1 < -EDGE_TOLERANCE or y1 < -EDGE_TOLERANCE or x2 > width + EDGE_TOLERANCE or y2 > height + EDGE_TOLERANCE:
        raise DataError(f"{where}: box {_fmt(box)} (xyxy) reaches outside the {width}x{height} image.")


def _fmt(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _clipped(boxes: list[list[float]], width: int, height: int) -> np.ndarray:
    """K x 4 float32 boxes, clipped to the image (the tolerance allows a pixel of overshoot)."""
    array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    array[:, 0::2] = array[:, 0::2].clip(0, width)
    array[:, 1::2] = array[:, 1::2].clip(0, height)
    return array


# --- COCO ---------------------------------------------------------------------------------------


def load_coco(path: Path):
    """pycocotools' COCO index of ``path`` (its progress prints silenced); DataError if unreadable."""
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"Cannot read COCO annotations {path} ({error}).") from error


def coco_classes(coco) -> tuple[list[str], dict[int, int]]:
    """(["background", *category names by id], {category id: label}) with labels 1..K."""
    categories = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    return ["background", *(c["name"] for c in categories)], {c["id"]: i + 1 for i, c in enumerate(categories)}


def coco_records(coco, path: Path, image_dir: Path, label_of: dict[int, int]) -> list[Annotated]:
    """One checked record per image of ``coco``; crowd annotations skipped with a counted warning."""
    records, crowd = [], 0
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        if "width" not in info or "height" not in info or "file_name" not in info:
            raise DataError(f"{path}: image {image_id} lacks file_name, width or height.")
        width, height, file = int(info["width"]), int(info["height"]), image_dir / info["file_name"]
        if not file.is_file():
            raise DataError(f"{path}: image {image_id} names {file}, which is missing.")
        boxes, labels, ids = [], [], []
        for ann in coco.imgToAnns.get(image_id, []):
            where = f"{path}: annotation {ann.get('id')} of image {info['file_name']}"
            if ann.get("iscrowd", 0):
                crowd += 1
                continue
            if ann.get("category_id") not in label_of:
                raise DataError(f"{where}: unknown category id {ann.get('category_id')!r} (not in 'categories').")
            if len(ann.get("bbox") or ()) != 4:
                raise DataError(f"{where}: bbox should be [x, y, width, height], not {ann.get('bbox')!r}.")
            x, y, w, h = (float(v) for v in ann["bbox"])
            check_box([x, y, x + w, y + h], width, height, where)
            boxes.append([x, y, x + w, y + h])
            labels.append(label_of[ann["category_id"]])
            ids.append(ann["id"])
        records.append(Annotated(file, width, height, _clipped(boxes, width, height),
                                 np.asarray(labels, dtype=np.int64), str(path), tuple(ids), coco))
    if crowd:
        warnings.warn(f"{path}: skipped {crowd} crowd annotation(s) (iscrowd=1), as COCO training does", stacklevel=2)
    return records


def coco_image_dir(root: Path, split: str) -> Path:
    """Where the images of ``instances_<split>.json`` are: ``<split>/``, ``images/<split>/`` or ``images/``."""
    for folder in (root / split, root / "images" / split, root / "images"):
        if folder.is_dir():
            return folder
    raise DataError(f"No image folder for {root}/annotations/instances_{split}.json: expected {root / split}/, "
                    f"{root / 'images' / split}/ or {root / 'images'}/.")


def _coco_splits(root: Path, val_fraction: float, seed: int):
    """(train records, val records, classes) of a COCO folder."""
    files = sorted((root / "annotations").glob("instances_*.json"))
    by_split = {f.stem[len("instances_"):]: f for f in files}
    train = [s for s in by_split if s.startswith("train")]
    val = [s for s in by_split if s.startswith("val")]
    if train and val:
        chosen = (train[0], val[0])
    elif len(by_split) == 1:
        chosen = (next(iter(by_split)),)
    else:
        raise DataError(f"{root / 'annotations'} should hold instances_train*.json and instances_val*.json "
                        f"(or a single instances_*.json to split), found {', '.join(f.name for f in files)}.")
    cocos = [load_coco(by_split[s]) for s in chosen]
    classes, label_of = coco_classes(cocos[0])
    if len(cocos) == 2 and coco_classes(cocos[1])[0] != classes:
        raise DataError(f"{by_split[chosen[0]]} and {by_split[chosen[1]]} list different categories.")
    splits = [coco_records(c, by_split[s], coco_image_dir(root, s), label_of) for c, s in zip(cocos, chosen)]
    if len(splits) == 1:
        splits = list(_split_pairs(splits[0], val_fraction, seed))
    return splits[0], splits[1], classes


# --- Pascal VOC ---------------------------------------------------------------------------------


def _voc_object(obj, index: int, path: Path, width: int, height: int) -> tuple[list[float], int]:
    """One checked VOC ``<object>``: (xyxy box, label)."""
    where = f"{path}: object {index + 1}"
    name = (obj.findtext("name") or "").strip()
    if name not in VOC_CLASSES[1:]:
        raise DataError(f"{where}: unknown class {name!r} (Pascal VOC has {', '.join(VOC_CLASSES[1:])}).")
    try:
        box = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
    except (AttributeError, TypeError, ValueError) as error:
        raise DataError(f"{where}: bndbox needs numeric xmin, ymin, xmax, ymax.") from error
    box = [box[0] - 1, box[1] - 1, box[2], box[3]]  # VOC counts pixels from 1, inclusive
    check_box(box, width, height, where)
    return box, VOC_CLASSES.index(name)


def voc_record(root: Path, name: str) -> Annotated:
    """The checked annotations of VOC image ``name``."""
    path, image = root / "Annotations" / f"{name}.xml", root / "JPEGImages" / f"{name}.jpg"
    if not path.is_file():
        raise DataError(f"Annotation file {path} is missing.")
    if not image.is_file():
        raise DataError(f"Image {image} of {path} is missing.")
    try:
        tree = ElementTree.parse(path).getroot()
        width, height = int(tree.findtext("size/width")), int(tree.findtext("size/height"))
    except (ElementTree.ParseError, TypeError, ValueError) as error:
        raise DataError(f"Cannot read {path} ({error}); it needs <size><width> and <height>.") from error
    objects = [_voc_object(obj, i, path, width, height) for i, obj in enumerate(tree.findall("object"))]
    return Annotated(image, width, height, _clipped([b for b, _ in objects], width, height),
                     np.asarray([label for _, label in objects], dtype=np.int64), str(path))


def _voc_splits(root: Path, masks: bool):
    if masks:
        raise DataError(f"{root} is a Pascal VOC detection folder: its XML holds boxes, not instance masks; "
                        "use --task detection.")
    splits = []
    for split in ("train", "val"):
        listing = root / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise DataError(f"Pascal VOC split file {listing} is missing.")
        names = [line.split()[0] for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
        splits.append([voc_record(root, name) for name in names])
    return splits[0], splits[1], list(VOC_CLASSES)


# --- entry point --------------------------------------------------------------------------------


def detect_detection_layout(root: Path) -> str:
    """"coco" or "voc" from the files under ``root``; DataError if neither fits."""
    if any((root / "annotations").glob("instances_*.json")):
        return "coco"
    if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
        return "voc"
    raise DataError(f"{root} is not a detection dataset: expected annotations/instances_*.json (COCO) or "
                    "Annotations/ + JPEGImages/ + ImageSets/Main/ (Pascal VOC).")


def build_detection_datasets(
    source: str | Path,
    image_size: int,
    mean=None,
    std=None,
    *,
    val_fraction: float = 0.2,
    train_limit: int | None = None,
    val_limit: int | None = None,
    augment: bool = True,
    seed: int = 0,
    masks: bool = False,
) -> DetectionSplits:
    """Train and val detection datasets (``masks``: with instance masks) from fashion-scenes or a folder.

    Images come out in [0, 1]: torchvision's detectors normalise them (``mean`` and ``std``
    are accepted for a common signature and unused). Limits as for segmentation.
    """
    train_tf, eval_tf = make_detection_transforms(image_size, augment)
    if is_fashion_scenes(source):
        train = SceneDetectionDataset(load_scenes("train", train_limit or TRAIN_SCENES, SCENE_SIZE, seed), train_tf, masks)
        val = SceneDetectionDataset(load_scenes("val", val_limit or VAL_SCENES, SCENE_SIZE, seed), eval_tf, masks)
        return DetectionSplits(train, val, list(SCENE_CLASSES))
    root = Path(source).expanduser()
    if not root.is_dir():
        raise DataError(f"Detection source {source} is neither 'fashion-scenes' nor a folder.")
    root = unwrap_voc(root)
    layout = detect_detection_layout(root)
    if layout == "coco":
        train, val, classes = _coco_splits(root, val_fraction, seed)
    else:
        train, val, classes = _voc_splits(root, masks)
    return DetectionSplits(
        AnnotatedDetectionDataset(_limit(train, train_limit, seed), train_tf, masks),
        AnnotatedDetectionDataset(_limit(val, val_limit, seed), eval_tf, masks),
        classes,
    )
