"""``build_datasets``: train/val torch datasets from any ``--data`` source.

Sources: an image folder, a bundled dataset name, ``hf:NAME[:CONFIG]`` (or a ``save_to_disk``
folder or ``.parquet`` file), ``torchvision:NAME`` and ``vtab:ROOT/TASK[:tune]``.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from deltavision.data import hub, torchvision_sets, vtab
from deltavision.data.bundled import BUNDLED_LOADERS, bundled_name
from deltavision.data.datasets import ArrayImageDataset, FetchedImageDataset, ImageFileDataset
from deltavision.data.folder import check_image_files, scan_image_folder
from deltavision.data.sampling import stratified_split, stratified_subset
from deltavision.data.transforms import Augmentation, make_transforms
from deltavision.errors import DataError

# Distinct seed streams, so that splitting and each limit draw independent samples.
SPLIT_STREAM, TRAIN_LIMIT_STREAM, VAL_LIMIT_STREAM = 0, 1, 2
SOURCE_PREFIXES = ("hf", "torchvision", "vtab")
DATA_OPTIONS = ("image_column", "label_column", "data_root", "download")


@dataclass
class DatasetSplits:
    """Train and val datasets yielding ``(CxHxW float tensor, int label)``, and the class names."""

    train: Dataset
    val: Dataset
    classes: list[str]

    @property
    def num_classes(self) -> int:
        """How many classes the labels index into."""
        return len(self.classes)


@dataclass(frozen=True)
class _Options:
    """The build_datasets arguments that shape splits and transforms."""

    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    val_fraction: float
    train_limit: int | None
    val_limit: int | None
    augment: bool
    seed: int
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    augmentation: Augmentation = Augmentation()
    transforms_wanted: bool = True

    def transforms(self, flip: bool, whole_frame: bool = False):
        """``(train_tf, eval_tf)`` for these options (``(None, None)``: untransformed images).

        ``whole_frame``: the object fills a tiny image (the bundled 28 px and 8 px sets), so evaluation
        resizes the whole image instead of cutting the backbone's centre crop out of it, and the
        upscaling is bilinear whatever the backbone's interpolation. Measured on Fashion-MNIST at
        64 px with EfficientNet-Lite0 (compare's default), top-1 of linear / SSF / full: 74.6 (linear)
        with the backbone's crop and bicubic; 78.6 / 82.2 / 84.8 uncropped bicubic; 80.2 / 84.2 / 85.6
        uncropped bilinear, against 81.2 / 83.8 / 86.4 before timm's transforms.
        """
        if not self.transforms_wanted:
            return None, None
        return make_transforms(
            self.image_size, self.mean, self.std, self.augment, flip=flip,
            interpolation="bilinear" if whole_frame else self.interpolation,
            crop_pct=1.0 if whole_frame else self.crop_pct, augmentation=self.augmentation,
        )

    def split_indices(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stratified ``(train, val)`` indices of one labelled pool."""
        return stratified_split(labels, self.val_fraction, seed=(self.seed, SPLIT_STREAM))


Pool = ArrayImageDataset | ImageFileDataset | FetchedImageDataset


@dataclass(frozen=True)
class _Part:
    """The samples ``indices`` of an untransformed dataset ``pool``."""

    pool: Pool
    indices: np.ndarray

    @classmethod
    def whole(cls, pool: Pool) -> "_Part":
        """Every sample of ``pool``."""
        return cls(pool, np.arange(len(pool)))

    def limited(self, limit: int | None, seed: tuple[int, int]) -> "_Part":
        """A seeded class-stratified subset of at most ``limit`` of these samples."""
        keep = stratified_subset(self.pool.labels[self.indices], limit, seed)
        return _Part(self.pool, self.indices[keep])


def _split_part(pool: Pool, options: _Options) -> tuple[_Part, _Part]:
    """``(train, val)`` parts of one pool, stratified by ``options.val_fraction``."""
    train_indices, val_indices = options.split_indices(pool.labels)
    return _Part(pool, train_indices), _Part(pool, val_indices)


def _finish(source: str | Path, classes: list[str], train: _Part, val: _Part, options: _Options, flip: bool,
            whole_frame: bool = False) -> DatasetSplits:
    """Apply the limits and transforms to the train/val parts; DataError if either ends up empty."""
    train = train.limited(options.train_limit, (options.seed, TRAIN_LIMIT_STREAM))
    val = val.limited(options.val_limit, (options.seed, VAL_LIMIT_STREAM))
    for name, part in (("train", train), ("val", val)):
        if len(part.indices) == 0:
            raise DataError(f"Dataset {source} has an empty {name} split; add images or change val_fraction/limits.")
    train_tf, eval_tf = options.transforms(flip, whole_frame)
    return DatasetSplits(train.pool.subset(train.indices, train_tf), val.pool.subset(val.indices, eval_tf), classes)


def _bundled_splits(name: str, options: _Options) -> DatasetSplits:
    """Splits of a bundled dataset: its official val split if it has one, else a stratified split."""
    data = BUNDLED_LOADERS[name]()
    pool = ArrayImageDataset(data.images, data.labels)
    if data.val_images is None:
        train, val = _split_part(pool, options)
    else:
        train, val = _Part.whole(pool), _Part.whole(ArrayImageDataset(data.val_images, data.val_labels))
    return _finish(name, list(data.classes), train, val, options, data.flip, whole_frame=True)


def _folder_splits(source: str | Path, options: _Options) -> DatasetSplits:
    """Splits of an image folder (train/ + val/ layout, or class folders split by val_fraction).

    Only the files that end up in the splits are verified, so limits keep the check cheap.
    """
    train_files, val_files = scan_image_folder(source)
    pool = ImageFileDataset(train_files.paths, train_files.labels)
    if val_files is None:
        train, val = _split_part(pool, options)
    else:
        train, val = _Part.whole(pool), _Part.whole(ImageFileDataset(val_files.paths, val_files.labels))
    splits = _finish(source, list(train_files.classes), train, val, options, flip=True)
    check_image_files([*splits.train.paths, *splits.val.paths])
    return splits


def _pool_pair(train: Pool, evaluation: Pool | None, options: _Options) -> tuple[_Part, _Part]:
    """``(train, val)`` parts: the official evaluation pool whole, or a stratified split of ``train``."""
    if evaluation is None:
        return _split_part(train, options)
    return _Part.whole(train), _Part.whole(evaluation)


def _hub_splits(spec: str, options: _Options, data_options: Mapping) -> DatasetSplits:
    """Splits of a Hugging Face dataset: its train and validation/test splits, or a split of its only one."""
    loaded = hub.load_hub_splits(spec)
    source = loaded.source
    image, label = hub.hub_columns(
        loaded.train, source, data_options.get("image_column"), data_options.get("label_column")
    )
    classes = hub.class_names(loaded.train, label) or hub.plain_classes(loaded.train, label)

    def pool(dataset, split: str) -> FetchedImageDataset:
        if label not in dataset.features or image not in dataset.features:
            raise DataError(f"Hugging Face dataset {source}: its {split} split lacks the column {label!r} or {image!r}.")
        labels = hub.hub_labels(dataset, label, classes, source, split)
        return FetchedImageDataset(hub.HubImages(hub.as_image_column(dataset, image, source), image), labels)

    evaluation = None if loaded.evaluation is None else pool(loaded.evaluation, "evaluation")
    train, val = _pool_pair(pool(loaded.train, "train"), evaluation, options)
    return _finish(f"hf:{spec}", classes, train, val, options, flip=True)


def _torchvision_splits(name: str, options: _Options, data_options: Mapping) -> DatasetSplits:
    """Splits of a torchvision dataset under ``data_root``: its own train/test (or val) split, else a stratified one."""
    train_set, eval_set = torchvision_sets.load_torchvision(
        name, data_options.get("data_root"), bool(data_options.get("download", False))
    )
    labels = torchvision_sets.dataset_labels(train_set)
    train = FetchedImageDataset(torchvision_sets.TorchvisionImages(train_set), labels)
    evaluation = None
    if eval_set is not None:
        evaluation = FetchedImageDataset(
            torchvision_sets.TorchvisionImages(eval_set), torchvision_sets.dataset_labels(eval_set)
        )
    classes = torchvision_sets.dataset_classes(train_set, labels)
    parts = _pool_pair(train, evaluation, options)
    flip = type(train_set).__name__ not in torchvision_sets.NO_FLIP
    return _finish(f"torchvision:{name}", classes, *parts, options, flip=flip)


def _vtab_splits(spec: str, options: _Options) -> DatasetSplits:
    """A VTAB-1k task: train800val200 -> test (the papers' protocol), or train800 -> val200 with ``:tune``.

    No flips: they would change the label of orientation and position tasks.
    """
    task_dir, protocol = vtab.parse_vtab_source(spec)
    train, evaluation, classes = vtab.read_vtab_task(task_dir, protocol)
    parts = _Part.whole(ImageFileDataset(train.paths, train.labels)), _Part.whole(
        ImageFileDataset(evaluation.paths, evaluation.labels)
    )
    return _finish(f"vtab:{spec}", classes, *parts, options, flip=False)


def source_kind(source: str | Path) -> tuple[str, str | Path]:
    """``(kind, rest)``: kind is hf, torchvision, vtab, bundled or folder."""
    if isinstance(source, str):
        prefix, sep, rest = source.partition(":")
        if sep and prefix in SOURCE_PREFIXES:
            return prefix, rest
        name = bundled_name(source)
        if name is not None:
            return "bundled", name
    path = Path(source).expanduser()
    if hub.is_saved_dataset(path) or path.suffix == ".parquet":
        return "hf", str(path)
    return "folder", source


def _check_data_options(data_options: Mapping) -> None:
    unknown = sorted(set(data_options) - set(DATA_OPTIONS))
    if unknown:
        raise DataError(f"Unknown data option(s) {', '.join(unknown)}; known: {', '.join(DATA_OPTIONS)}.")


def build_datasets(
    source: str | Path,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    val_fraction: float = 0.2,
    train_limit: int | None = None,
    val_limit: int | None = None,
    augment: bool = True,
    seed: int = 0,
    data_options: Mapping | None = None,
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
    augmentation: Augmentation = Augmentation(),
    transforms: bool = True,
) -> DatasetSplits:
    """Build train/val datasets from an image folder path, a bundled dataset name or a prefixed source.

    ``hf:NAME[:CONFIG]`` loads through Hugging Face ``datasets`` (a ``save_to_disk`` folder or a
    ``.parquet`` file also works without the prefix); ``torchvision:NAME`` loads a torchvision
    classification dataset from ``data_options["data_root"]`` (downloading only with
    ``data_options["download"]``); ``vtab:ROOT/TASK`` reads a VTAB-1k task folder
    (train800val200 -> test; ``vtab:ROOT/TASK:tune`` for train800 -> val200).
    ``data_options`` may also name the ``image_column`` / ``label_column`` of a Hugging Face dataset.

    Bundled names (``fashion-mnist``, ``mnist5k``, ``digits``) take precedence over a folder of
    the same name; write ``./digits`` (or pass a Path) to mean the folder. Items are ``(tensor, label)``: RGB (grey
    replicated), resized to ``image_size`` and normalised with ``mean``/``std`` by timm's transforms
    (:func:`~deltavision.data.transforms.make_transforms`: ``interpolation`` and eval ``crop_pct``, for
    folders only: the bundled sets' objects fill their tiny frames, which are resized whole and
    bilinearly; training ``augmentation``); ``transforms=False`` leaves items untransformed PIL images and
    needs no timm (the MIST edge lists its images so). Without an
    official or ``train/``+``val/`` split, ``val_fraction`` of each class goes to val (seeded).
    ``train_limit``/``val_limit`` keep a seeded class-stratified subset. Folder images are
    verified up front; any user data problem raises :class:`~deltavision.errors.DataError`.
    """
    options = _Options(image_size, mean, std, val_fraction, train_limit, val_limit, augment, seed,
                       interpolation, crop_pct, augmentation, transforms)
    data_options = dict(data_options or {})
    _check_data_options(data_options)
    kind, rest = source_kind(source)
    if kind == "hf":
        return _hub_splits(str(rest), options, data_options)
    if kind == "torchvision":
        return _torchvision_splits(str(rest), options, data_options)
    if kind == "vtab":
        return _vtab_splits(str(rest), options)
    if kind == "bundled":
        return _bundled_splits(str(rest), options)
    return _folder_splits(rest, options)
