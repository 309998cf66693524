"""torchvision's classification datasets (``--data torchvision:NAME --data-root DIR``).

Splits follow the dataset's own constructor: ``train=True/False`` (CIFAR, MNIST, ...), else
``split="train"`` with ``"val"`` or, failing that, ``"test"`` for evaluation (Flowers102, DTD,
SVHN, ...); a dataset with neither (Caltech101, EuroSAT, ...) is returned whole for the caller
to split. Nothing is downloaded unless asked.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from deltavision.errors import DataError

# Datasets whose images hold text or digits, where a horizontal flip is no valid augmentation.
NO_FLIP = frozenset({"MNIST", "EMNIST", "KMNIST", "QMNIST", "SVHN", "USPS", "RenderedSST2"})
LABEL_ATTRIBUTES = ("targets", "labels", "_labels", "y")
SOCKET_TIMEOUT_SECONDS = 30.0


def dataset_class(name: str) -> type:
    """The torchvision dataset class called ``name`` (case-insensitive); DataError if there is none."""
    import torchvision.datasets as tv_datasets

    names = {entry.lower(): entry for entry in tv_datasets.__all__}
    entry = names.get(name.lower())
    if entry is None:
        raise DataError(f"torchvision has no dataset {name!r}; choose one of {', '.join(sorted(names.values()))}.")
    return getattr(tv_datasets, entry)


def _construct(cls: type, root: Path, download: bool, **split: Any) -> Dataset:
    """``cls(root, download=download, **split)``, a missing dataset turned into DataError saying how to get it.

    A download whose connection stalls fails after :data:`SOCKET_TIMEOUT_SECONDS` instead of hanging.
    """
    from deltavision.data.bundled import socket_timeout

    try:
        with socket_timeout(SOCKET_TIMEOUT_SECONDS):
            return cls(str(root), download=download, **split)
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        hint = "check the folder" if download else f"pass --download to fetch it into {root}"
        raise DataError(f"torchvision {cls.__name__} is not in {root} ({error}); {hint}.") from error
    except OSError as error:
        if download:
            raise DataError(
                f"Could not download torchvision {cls.__name__} into {root} ({error}); "
                "check the network, or put its files there yourself."
            ) from error
        raise DataError(f"Cannot read torchvision {cls.__name__} from {root} ({error}).") from error
    except ValueError as error:
        raise DataError(f"Cannot read torchvision {cls.__name__} from {root} ({error}).") from error


def _evaluation_split(cls: type, root: Path, download: bool) -> Dataset:
    """The dataset's ``val`` split if it has one, else its ``test`` split."""
    try:
        return cls(str(root), split="val", download=download)
    except ValueError:  # torchvision's verify_str: "val" is not one of this dataset's splits
        return _construct(cls, root, download, split="test")
    except RuntimeError:
        return _construct(cls, root, download, split="val")


def load_torchvision(name: str, root: str | Path | None, download: bool) -> tuple[Dataset, Dataset | None]:
    """``(train, evaluation)`` torchvision datasets under ``root``; evaluation is None without an official split."""
    cls = dataset_class(name)
    if not root:
        raise DataError(f"torchvision:{name} needs --data-root DIR, the folder torchvision keeps it in.")
    root = Path(root).expanduser()
    parameters = inspect.signature(cls).parameters
    if "train" in parameters:
        return _construct(cls, root, download, train=True), _construct(cls, root, download, train=False)
    if "split" in parameters:
        return _construct(cls, root, download, split="train"), _evaluation_split(cls, root, download)
    return _construct(cls, root, download), None


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Integer labels of a torchvision dataset, from its label attribute, else by reading every item."""
    for attribute in LABEL_ATTRIBUTES:
        values = getattr(dataset, attribute, None)
        if values is not None and len(values) == len(dataset):
            return np.asarray([int(v) for v in values], dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def dataset_classes(dataset: Dataset, labels: np.ndarray) -> list[str]:
    """The dataset's class names, or the label numbers when it has none."""
    classes = getattr(dataset, "classes", None)
    if classes and len(classes) > int(labels.max(initial=0)):
        return [str(name) for name in classes]
    return [str(label) for label in range(int(labels.max(initial=0)) + 1)]


class TorchvisionImages:
    """Fetches the PIL image of item ``index`` of a torchvision dataset (picklable for loader workers)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __call__(self, index: int) -> Image.Image:
        image = self.dataset[index][0]
        return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
