"""Hugging Face ``datasets``: hub names (``hf:NAME[:CONFIG]``), ``save_to_disk`` folders and parquet files.

The image column is the one whose feature is ``datasets.Image`` and the label column the
``datasets.ClassLabel`` one (their names also come from it), unless named by ``image_column`` /
``label_column``. Splits: ``train``, evaluated on ``validation`` (or ``val``, ``valid``, ``test``);
a dataset with only one split is returned alone for the caller to split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deltavision.errors import DataError

EVALUATION_SPLITS = ("validation", "val", "valid", "test")
SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")
FALLBACK_IMAGE_COLUMNS = ("image", "img")
FALLBACK_LABEL_COLUMNS = ("label", "labels")


@dataclass(frozen=True)
class HubSplits:
    """The train split, the evaluation split (None when there is none) and where they came from."""

    train: Any
    evaluation: Any | None
    source: str


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES)


def _load(name: str, config: str | None) -> Any:
    """A Dataset or DatasetDict from a saved folder, a parquet file or the hub; DataError on failure."""
    import datasets

    path = Path(name).expanduser()
    try:
        if is_saved_dataset(path):
            return datasets.load_from_disk(str(path))
        if path.suffix == ".parquet":
            if not path.is_file():
                raise DataError(f"Parquet file {path} does not exist.")
            return datasets.load_dataset("parquet", data_files=str(path))
        return datasets.load_dataset(name, config)
    except DataError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        offline = " (offline: only save_to_disk folders, parquet files and cached datasets load)"
        raise DataError(f"Cannot load Hugging Face dataset {name}{offline}: {error}") from error


def load_hub_splits(spec: str) -> HubSplits:
    """Train and evaluation splits of ``NAME[:CONFIG]``, a saved-dataset folder or a parquet file."""
    import datasets

    name, _, config = spec.partition(":")
    loaded = _load(name, config or None)
    if isinstance(loaded, datasets.Dataset):
        return HubSplits(loaded, None, name)
    splits = dict(loaded)
    if "train" not in splits:
        if len(splits) != 1:
            raise DataError(f"Hugging Face dataset {name} has no 'train' split (it has {', '.join(splits)}).")
        return HubSplits(next(iter(splits.values())), None, name)
    evaluation = next((splits[split] for split in EVALUATION_SPLITS if split in splits), None)
    return HubSplits(splits["train"], evaluation, name)


def _pick_column(features: dict, kind: type, named: str | None, fallbacks: tuple[str, ...], what: str, source: str) -> str:
    """The column named by the user, else the single one of feature type ``kind``, else a usual name."""
    if named:
        if named not in features:
            raise DataError(f"Hugging Face dataset {source} has no column {named!r} (--{what}-column); it has {', '.join(features)}.")
        return named
    typed = [column for column, feature in features.items() if isinstance(feature, kind)]
    if len(typed) == 1:
        return typed[0]
    named_alike = [column for column in fallbacks if column in features]
    if not typed and named_alike:
        return named_alike[0]
    found = f"several {kind.__name__} columns ({', '.join(typed)})" if typed else f"no {kind.__name__} column"
    raise DataError(f"Hugging Face dataset {source} has {found}; name the {what} column with --{what}-column.")


def hub_columns(dataset: Any, source: str, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """``(image column, label column)`` of ``dataset``, found by feature type unless named."""
    import datasets

    features = dict(dataset.features)
    image = _pick_column(features, datasets.Image, image_column, FALLBACK_IMAGE_COLUMNS, "image", source)
    label = _pick_column(features, datasets.ClassLabel, label_column, FALLBACK_LABEL_COLUMNS, "label", source)
    return image, label


def _column_values(dataset: Any, column: str) -> np.ndarray:
    """One column as a numpy array."""
    return np.asarray(dataset.select_columns([column]).with_format("numpy")[:][column])


def class_names(dataset: Any, label_column: str) -> list[str] | None:
    """The ClassLabel names of ``label_column``, or None when it is a plain column."""
    import datasets

    feature = dataset.features[label_column]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def hub_labels(dataset: Any, label_column: str, classes: list[str], source: str, split: str) -> np.ndarray:
    """Integer labels indexing ``classes``; string labels are looked up by name. DataError outside the range."""
    values = _column_values(dataset, label_column)
    if values.dtype.kind in "US":
        lookup = {name: index for index, name in enumerate(classes)}
        unknown = sorted({str(v) for v in values} - set(lookup))
        if unknown:
            raise DataError(f"Hugging Face dataset {source} ({split}) has labels {unknown[:3]} not in the training classes.")
        return np.asarray([lookup[str(v)] for v in values], dtype=np.int64)
    if values.dtype.kind not in "iu":
        raise DataError(f"Hugging Face dataset {source}: label column {label_column!r} holds {values.dtype} values, not class ids.")
    outside = values[(values < 0) | (values >= len(classes))]
    if len(outside):
        raise DataError(
            f"Hugging Face dataset {source} ({split}): label column {label_column!r} has value {int(outside[0])}, "
            f"outside 0..{len(classes) - 1}; drop unlabelled rows or name another --label-column."
        )
    return values.astype(np.int64)


def plain_classes(train: Any, label_column: str) -> list[str]:
    """Class names for a label column that is no ClassLabel: sorted names, or the ids 0..max."""
    values = _column_values(train, label_column)
    if values.dtype.kind in "US":
        return sorted({str(v) for v in values})
    if values.dtype.kind not in "iu":
        raise DataError(f"Label column {label_column!r} holds {values.dtype} values, not class ids or names.")
    return [str(label) for label in range(int(values.max(initial=0)) + 1)]


def as_image_column(dataset: Any, column: str, source: str) -> Any:
    """``dataset`` with only ``column``, decoded as images (paths or encoded bytes are cast to Image)."""
    import datasets

    dataset = dataset.select_columns([column])
    if isinstance(dataset.features[column], datasets.Image):
        return dataset
    try:
        return dataset.cast_column(column, datasets.Image())
    except (TypeError, ValueError) as error:
        raise DataError(f"Hugging Face dataset {source}: column {column!r} does not hold images ({error}).") from error


class HubImages:
    """Fetches the PIL image of row ``index`` of a one-column image dataset (picklable for loader workers)."""

    def __init__(self, dataset: Any, column: str):
        self.dataset = dataset
        self.column = column

    def __call__(self, index: int) -> Image.Image:
        return self.dataset[index][self.column]
