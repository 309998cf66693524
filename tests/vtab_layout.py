"""Writes tiny VTAB-1k task folders in NOAH's layout for the tests."""

from pathlib import Path

import numpy as np
from PIL import Image

LISTS = {"train800.txt": (0, 6), "val200.txt": (6, 8), "train800val200.txt": (0, 8), "test.txt": (8, 12)}


def write_vtab_task(root: Path, task: str, labels: int = 2, size: int = 32, seed: int = 0) -> Path:
    """``root/task/images/*.png`` (12 images, label i % labels, brightness by label) and the four lists."""
    task_dir = root / task
    (task_dir / "images").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    entries = []
    for index in range(12):
        label = index % labels
        pixels = np.clip(rng.normal(60 + 120 * label / max(labels - 1, 1), 10, (size, size, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(task_dir / "images" / f"{index:04d}.png")
        entries.append(f"images/{index:04d}.png {label}")
    for name, (start, stop) in LISTS.items():
        (task_dir / name).write_text("\n".join(entries[start:stop]) + "\n")
    return task_dir
