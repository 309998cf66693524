"""The VTAB-1k file release in the layout NOAH and SSF use: one folder per task holding images and lists.

``<root>/<task>/train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt`` hold one
``relative/image/path label`` line per image (paths relative to the task folder). The papers'
protocol trains on ``train800val200`` and reports ``test`` top-1 (:data:`FINAL_LISTS`);
hyper-parameters are tuned by training on ``train800`` and scoring ``val200`` (:data:`TUNE_LISTS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deltavision.errors import DataError

FINAL_LISTS = ("train800val200.txt", "test.txt")
TUNE_LISTS = ("train800.txt", "val200.txt")
PROTOCOLS = {"final": FINAL_LISTS, "tune": TUNE_LISTS}

NATURAL = ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397")
SPECIALIZED = ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy")
STRUCTURED = (
    "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele",
)  # fmt: skip
GROUPS = {"natural": NATURAL, "specialized": SPECIALIZED, "structured": STRUCTURED}
TASKS = NATURAL + SPECIALIZED + STRUCTURED  # NOAH's folder names, in the papers' column order

# Classes per task (SSF paper, Table 8; NOAH's counts): a 1000-image training list need not show every class, so the
# head's size comes from here rather than from the labels seen.
NUM_CLASSES = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}  # fmt: skip


@dataclass(frozen=True)
class ListedImages:
    """The images of one list file, with their labels."""

    paths: list[Path]
    labels: np.ndarray


def parse_vtab_source(spec: str) -> tuple[Path, str]:
    """``ROOT/TASK`` or ``ROOT/TASK:tune`` (after ``vtab:``) -> (task folder, protocol name)."""
    folder, sep, protocol = spec.rpartition(":")
    if not sep or protocol not in PROTOCOLS:
        folder, protocol = spec, "final"
    return Path(folder).expanduser(), protocol


def read_list(task_dir: Path, name: str) -> ListedImages:
    """The ``path label`` lines of ``task_dir/name``; DataError names the file and line of any bad entry."""
    list_file = task_dir / name
    if not list_file.is_file():
        raise DataError(
            f"VTAB-1k list {list_file} is missing; a task folder holds {', '.join(FINAL_LISTS + TUNE_LISTS)} "
            "with one 'relative/image/path label' line per image."
        )
    paths, labels = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        path, _, label = line.strip().rpartition(" ")
        if not path or not label.isdigit():
            raise DataError(f"{list_file}:{number}: expected 'relative/image/path label' with a label >= 0, got {line!r}.")
        paths.append(task_dir / path.strip())
        labels.append(int(label))
    if not paths:
        raise DataError(f"VTAB-1k list {list_file} lists no images.")
    return ListedImages(paths, np.asarray(labels, dtype=np.int64))


def _check_files(listed: ListedImages, list_file: Path) -> None:
    """DataError naming the first listed image that does not exist."""
    for path in listed.paths:
        if not path.is_file():
            raise DataError(f"{list_file} lists {path}, which does not exist; restore it or fix the list.")


def _check_labels(listed: ListedImages, list_file: Path, num_classes: int) -> None:
    """DataError naming the first label outside ``0..num_classes-1``."""
    outside = np.flatnonzero(listed.labels >= num_classes)
    if len(outside):
        first = outside[0]
        raise DataError(
            f"{list_file} gives {listed.paths[first].name} label {listed.labels[first]}, outside 0..{num_classes - 1} "
            f"(the task has {num_classes} classes)."
        )


def read_vtab_task(task_dir: Path, protocol: str = "final") -> tuple[ListedImages, ListedImages, list[str]]:
    """``(train, evaluation, classes)`` of one VTAB-1k task folder under ``protocol`` (final or tune).

    Known tasks (NOAH's folder names) have their fixed class count; another folder gets one class
    per label up to the largest label listed. Every listed image must exist.
    """
    if not task_dir.is_dir():
        raise DataError(f"VTAB-1k task folder {task_dir} does not exist; pass vtab:ROOT/TASK with TASK one of {', '.join(TASKS)}.")
    train_name, eval_name = PROTOCOLS[protocol]
    train, evaluation = read_list(task_dir, train_name), read_list(task_dir, eval_name)
    num_classes = NUM_CLASSES.get(task_dir.name) or int(max(train.labels.max(), evaluation.labels.max())) + 1
    for listed, name in ((train, train_name), (evaluation, eval_name)):
        _check_labels(listed, task_dir / name, num_classes)
        _check_files(listed, task_dir / name)
    return train, evaluation, [str(label) for label in range(num_classes)]
