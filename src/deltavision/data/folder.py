"""Image folders: ``root/<class>/*`` or ``root/train/<class>/*`` + ``root/val/<class>/*``."""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from deltavision.data.images import IMAGE_EXTENSIONS, check_image_file, is_image_file
from deltavision.data.sampling import stratified_split
from deltavision.errors import ArtifactExistsError, DataError

SPLIT_FOLDERS = ("train", "val")
LAYOUT_HINT = "put each class's images in its own subfolder (root/<class>/img.png) or use root/train/<class>/ and root/val/<class>/"


@dataclass(frozen=True)
class LabelledFiles:
    """Image paths with their integer labels, indexing into ``classes``."""

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]


def _is_visible(path: Path, below: Path) -> bool:
    """True unless a component of ``path`` under ``below`` is hidden (starts with a dot)."""
    return not any(part.startswith(".") for part in path.relative_to(below).parts)


def _class_images(class_dir: Path) -> list[Path]:
    """Sorted image files anywhere under ``class_dir``, hidden files and folders excluded."""
    return sorted(p for p in class_dir.rglob("*") if _is_visible(p, class_dir) and is_image_file(p))


def read_class_folders(folder: Path) -> LabelledFiles:
    """Index ``folder/<class>/...`` images; classes are the sorted visible subfolder names."""
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"Image folder {folder} has no class subfolders; {LAYOUT_HINT}.")
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        images = _class_images(class_dir)
        if not images:
            extensions = " ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"Class folder {class_dir} has no images ({extensions}); add images or remove it.")
        paths.extend(images)
        labels.extend([label] * len(images))
    return LabelledFiles(paths, np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs])


def _check_same_classes(root: Path, train: LabelledFiles, val: LabelledFiles) -> None:
    """Raise DataError unless train/ and val/ hold the same class folders."""
    if train.classes == val.classes:
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    raise DataError(
        f"Image folder {root}: train/ and val/ class folders differ (only in train: {only_train}, "
        f"only in val: {only_val}); give both the same class subfolders."
    )


def scan_image_folder(root: str | Path) -> tuple[LabelledFiles, LabelledFiles | None]:
    """Index an image folder as ``(train, val)``; ``val`` is None for the flat ``root/<class>/`` layout."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Image folder {root} does not exist; pass an existing folder or a bundled dataset name.")
    train_dir, val_dir = (root / name for name in SPLIT_FOLDERS)
    if train_dir.is_dir() != val_dir.is_dir():
        present, missing = ("train", "val") if train_dir.is_dir() else ("val", "train")
        raise DataError(f"Image folder {root} has {present}/ but no {missing}/; add {missing}/ or {LAYOUT_HINT}.")
    if not train_dir.is_dir():
        return read_class_folders(root), None
    train, val = read_class_folders(train_dir), read_class_folders(val_dir)
    _check_same_classes(root, train, val)
    return train, val


def check_image_files(paths: Sequence[Path]) -> None:
    """Verify every file cheaply (in a thread pool); DataError names the first unreadable one."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in pool.map(check_image_file, paths):
            pass


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 arrays unchanged; other numeric arrays rescaled linearly from [0, max] to [0, 255]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    peak = float(images.max(initial=0))
    scale = 255.0 / peak if peak > 0 else 1.0
    return np.clip(np.rint(images * scale), 0, 255).astype(np.uint8)


def _write_pngs(folder: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, classes: Sequence[str]) -> None:
    """Write ``images[indices]`` as ``folder/<class>/<index>.png``."""
    for index in indices:
        class_dir = folder / classes[labels[index]]
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(class_dir / f"{index:06d}.png")


def write_image_folder(
    root: str | Path,
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    *,
    val_fraction: float = 0.25,
    split: bool = True,
    seed: int = 0,
) -> Path:
    """Write images (N x H x W grey or N x H x W x 3) as a PNG image folder and return its path.

    With ``split=True`` (default) the layout is ``root/train/<class>/`` and ``root/val/<class>/``
    (a stratified, seeded ``val_fraction`` goes to val); with ``split=False`` it is
    ``root/<class>/``. Non-uint8 images (e.g. sklearn digits, 0..16) are rescaled to 0..255.
    Refuses to write into a non-empty folder.
    """
    root = Path(root)
    if root.is_file() or (root.is_dir() and any(root.iterdir())):
        raise ArtifactExistsError(f"Folder {root} is not empty; choose a new or empty folder.")
    pixels, labels = _to_uint8(images), np.asarray(labels, dtype=np.int64)
    if not split:
        _write_pngs(root, pixels, labels, np.arange(len(labels)), classes)
        return root
    train_indices, val_indices = stratified_split(labels, val_fraction, seed)
    _write_pngs(root / "train", pixels, labels, train_indices, classes)
    _write_pngs(root / "val", pixels, labels, val_indices, classes)
    return root
