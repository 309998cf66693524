"""The edge's local feature cache: received Gather_k tensors as safetensors shards.

Layout under the cache root::

    <fingerprint>/manifest.json                  dataset: classes, train/val image digests and labels
    <fingerprint>/k<k>-<dtype>/<shard>.safetensors  "features" (n, T, C) in the transfer dtype,
                                                  "scale" (n,) for int8; metadata: digests (JSON),
                                                  checksum (sha256 of names, dtypes, shapes, bytes)
    <fingerprint>/masks-<S>/<shard>.safetensors    segmentation only: "masks" (n, S, S) uint8 class ids
                                                  (255 = ignore), nearest-resized to the service's
                                                  input size S; same metadata

One folder per service fingerprint keeps features of different backbones or
weights apart. Every shard is written atomically (temporary file + rename) and
named after the image digests it holds, so an interrupted download leaves only whole
shards, and a resumed one asks the service only for images no shard holds.
Reading goes through safetensors' lazy slices: only the rows of one batch are
materialised, so the cache can be larger than the edge's memory.

Damage is detected, never trained on: every shard's checksum is verified when
its folder is first indexed, and a shard that fails (flipped bytes, a rewritten
tensor, no checksum) counts as absent and is listed in :meth:`FeatureStore.damaged`.
Online, :func:`..client.download_features` deletes such shards and fetches
their images again; offline, the commands stop with an error naming them.
Rows read must be finite and of the expected (T, C) shape.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ...errors import AdapterFileError
from ...io import load_json, save_json, save_tensors
from ..wire import to_float32, transfer_dtype

MANIFEST = "manifest.json"
IGNORE_LABEL = 255
SHARD_SUFFIX = ".safetensors"


class FeatureStore:
    """The shards of one feature space (service fingerprint) under a cache root."""

    def __init__(self, root: Path, fingerprint: str):
        if not fingerprint:
            raise ValueError("a feature store needs the service fingerprint")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.folder = self.root / fingerprint
        self._index: dict[Path, dict[str, tuple[Path, int]]] = {}
        self._damaged: dict[Path, list[Path]] = {}

    # --- manifest -------------------------------------------------------------------------------

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        save_json({**manifest, "fingerprint": self.fingerprint}, self.folder / MANIFEST)

    def read_manifest(self) -> dict[str, Any]:
        return load_json(self.folder / MANIFEST)

    # --- shards ---------------------------------------------------------------------------------

    def shard_folder(self, k: int, dtype: str) -> Path:
        return self.folder / f"k{k}-{dtype}"

    def mask_folder(self, size: int) -> Path:
        return self.folder / f"masks-{size}"

    def index(self, k: int, dtype: str) -> dict[str, tuple[Path, int]]:
        """{image digest: (shard path, row)} of every shard on disk for ``k`` and ``dtype``."""
        return self._folder_index(self.shard_folder(k, dtype))

    def damaged(self, k: int, dtype: str) -> list[Path]:
        """Shards for ``k`` and ``dtype`` that failed their checksum (their rows count as absent)."""
        return self._folder_damaged(self.shard_folder(k, dtype))

    def discard_damaged(self, k: int, dtype: str) -> int:
        """Delete the damaged shards for ``k`` and ``dtype``; returns how many there were."""
        return self._discard_damaged(self.shard_folder(k, dtype))

    def missing(self, digests: Sequence[str], ks: Sequence[int], dtype: str) -> list[str]:
        """The digests (first occurrence order, no duplicates) lacking features for any of ``ks``."""
        indexes = [self.index(k, dtype) for k in ks]
        return [h for h in dict.fromkeys(digests) if any(h not in index for index in indexes)]

    def available_ks(self, digests: Sequence[str], dtype: str) -> list[int]:
        """The k values whose shards hold every one of ``digests``."""
        found = []
        for folder in sorted(self.folder.glob(f"k*-{dtype}")):
            k = int(folder.name[1:].split("-")[0])
            if not self.missing(digests, [k], dtype):
                found.append(k)
        return sorted(found)

    def write_shard(self, k: int, dtype: str, digests: list[str], features: torch.Tensor, scale: torch.Tensor | None) -> Path:
        """Store one received batch for ``k`` atomically; returns the shard path."""
        if features.dtype != transfer_dtype(dtype) or len(digests) != features.shape[0]:
            raise ValueError(f"features {features.dtype} x {features.shape[0]} do not match {dtype} x {len(digests)}")
        tensors = {"features": features.contiguous()}
        if scale is not None:
            tensors["scale"] = scale.contiguous()
        return self._write(self.shard_folder(k, dtype), digests, tensors, {"k": str(k), "dtype": dtype})

    def read(self, k: int, dtype: str, digests: Sequence[str], shape: Sequence[int] | None = None) -> torch.Tensor:
        """float32 (n, T, C) features of ``digests``, in order, reading only those rows.

        AdapterFileError if one is absent, not finite, or (given ``shape`` = (T, C)) of another shape.
        """
        index = self.index(k, dtype)
        absent = [h for h in digests if h not in index]
        if absent:
            raise AdapterFileError(f"the feature cache has no k={k} {dtype} features for {len(absent)} image(s)")
        by_shard: dict[Path, list[tuple[int, int]]] = defaultdict(list)
        for position, image in enumerate(digests):
            path, row = index[image]
            by_shard[path].append((position, row))
        batch: torch.Tensor | None = None
        for path, wanted in by_shard.items():
            for position, values in _read_rows(path, wanted):
                _check_row(path, values, shape)
                if batch is None:
                    batch = torch.empty((len(digests), *values.shape))
                batch[position] = values
        return batch if batch is not None else torch.empty(0)

    # --- segmentation masks -------------------------------------------------------------------

    def missing_masks(self, digests: Sequence[str], size: int) -> list[str]:
        """The digests (first occurrence order, no duplicates) without a stored ``size`` x ``size`` mask."""
        index = self._folder_index(self.mask_folder(size))
        return [h for h in dict.fromkeys(digests) if h not in index]

    def damaged_masks(self, size: int) -> list[Path]:
        return self._folder_damaged(self.mask_folder(size))

    def discard_damaged_masks(self, size: int) -> int:
        return self._discard_damaged(self.mask_folder(size))

    def write_masks(self, size: int, digests: list[str], masks: torch.Tensor) -> Path:
        """Store (n, size, size) uint8 class-id masks of ``digests`` as one shard, atomically."""
        if masks.dtype != torch.uint8 or tuple(masks.shape) != (len(digests), size, size):
            raise ValueError(f"masks {masks.dtype} {tuple(masks.shape)} are not uint8 {len(digests)} x {size} x {size}")
        return self._write(self.mask_folder(size), digests, {"masks": masks.contiguous()}, {"size": str(size)})

    def read_masks(self, size: int, digests: Sequence[str], num_classes: int) -> torch.Tensor:
        """int64 (n, size, size) masks of ``digests``, in order; AdapterFileError if one is absent
        or holds a label that is neither a class id below ``num_classes`` nor 255 (ignore)."""
        index = self._folder_index(self.mask_folder(size))
        absent = [h for h in digests if h not in index]
        if absent:
            raise AdapterFileError(f"the feature cache has no {size} x {size} masks for {len(absent)} image(s)")
        batch = torch.empty((len(digests), size, size), dtype=torch.int64)
        by_shard: dict[Path, list[tuple[int, int]]] = defaultdict(list)
        for position, image in enumerate(digests):
            path, row = index[image]
            by_shard[path].append((position, row))
        for path, wanted in by_shard.items():
            with safe_open(str(path), framework="pt") as shard:
                masks = shard.get_slice("masks")
                for position, row in wanted:
                    batch[position] = masks[row : row + 1][0].long()
        bad = (batch >= num_classes) & (batch != IGNORE_LABEL)
        if bad.any():
            raise AdapterFileError(
                f"the feature cache's masks hold label {int(batch[bad].max())}, but there are {num_classes} classes; "
                f"delete {self.mask_folder(size)} to rebuild them"
            )
        return batch

    # --- shard folders --------------------------------------------------------------------------

    def _folder_index(self, folder: Path) -> dict[str, tuple[Path, int]]:
        if folder not in self._index:
            self._index[folder], self._damaged[folder] = self._scan(folder)
        return self._index[folder]

    def _folder_damaged(self, folder: Path) -> list[Path]:
        self._folder_index(folder)
        return list(self._damaged[folder])

    def _discard_damaged(self, folder: Path) -> int:
        shards = self._folder_damaged(folder)
        for path in shards:
            path.unlink(missing_ok=True)
        self._damaged[folder] = []
        return len(shards)

    def _write(self, folder: Path, digests: list[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        """One shard of ``tensors`` (rows = ``digests``) in ``folder``, written atomically and indexed."""
        name = hashlib.sha256("".join(digests).encode()).hexdigest()[:24] + SHARD_SUFFIX
        path = folder / name
        metadata = {**metadata, "digests": json.dumps(digests), "checksum": checksum(tensors)}
        save_tensors(tensors, path, metadata=metadata)
        index = self._folder_index(folder)
        for row, image in enumerate(digests):
            index[image] = (path, row)
        return path

    def _scan(self, folder: Path) -> tuple[dict[str, tuple[Path, int]], list[Path]]:
        """(digest -> (shard, row) over the sound shards, the damaged shards) of one folder."""
        index: dict[str, tuple[Path, int]] = {}
        damaged: list[Path] = []
        for path in sorted(folder.glob(f"*{SHARD_SUFFIX}")):
            digests = _verified_digests(path)
            if digests is None:
                damaged.append(path)
                continue
            for row, image in enumerate(digests):
                index[image] = (path, row)
        return index, damaged


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _verified_digests(path: Path) -> list[str] | None:
    """The image digests a shard holds, or None if it is unreadable or fails its checksum."""
    try:
        with safe_open(str(path), framework="pt") as shard:
            metadata = shard.metadata() or {}
            tensors = {name: shard.get_tensor(name) for name in shard.keys()}
        digests = json.loads(metadata["digests"])
        rows = tensors["features" if "features" in tensors else "masks"].shape[0]
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError):
        return None
    if metadata.get("checksum") != checksum(tensors) or not isinstance(digests, list) or len(digests) != rows:
        return None
    return digests


def _check_row(path: Path, values: torch.Tensor, shape: Sequence[int] | None) -> None:
    if shape is not None and tuple(values.shape) != tuple(shape):
        raise AdapterFileError(
            f"feature cache shard {path.name} holds features of shape {tuple(values.shape)}, but the service's "
            f"are {tuple(shape)}; delete {path.parent} to fetch them again"
        )
    if not torch.isfinite(values).all():
        raise AdapterFileError(f"feature cache shard {path.name} holds non-finite values; delete it to fetch them again")


def _read_rows(path: Path, wanted: list[tuple[int, int]]):
    """Yield (position, float32 row) for each (position, row) of one shard."""
    with safe_open(str(path), framework="pt") as shard:
        features = shard.get_slice("features")
        scale = shard.get_tensor("scale") if "scale" in shard.keys() else None
        for position, row in wanted:
            stored = features[row : row + 1]
            yield position, to_float32(stored, None if scale is None else scale[row : row + 1])[0]
