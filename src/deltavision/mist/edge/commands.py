"""The edge commands as functions: fit, evaluate and predict with a feature service (or its cache).

``fit_edge`` lists the dataset's images, fetches each one's Gather_k once into
the local feature cache (resuming whatever an earlier run fetched), chooses k
on the validation split when asked to, trains the LAE and saves it with a
config naming the backbone, k, dtype, feature shape and classes. With
``offline=True`` nothing is fetched: the dataset and its features come from
the cache's manifest and shards alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import AdapterFileError, DeltaVisionError
from ...io import refuse_overwrite
from .client import (
    RETRY_SECONDS,
    FeatureClient,
    ImageItem,
    ServiceError,
    download_features,
    image_files,
    labelled_images,
    request_batches,
)
from ...model.state import count_parameters
from .network import CONFIG_FILE, EdgeConfig, EdgeNetwork, load_edge, save_edge
from .fit import FeatureSet, FitConfig, evaluate_edge, select_k, train_edge
from .store import MANIFEST, FeatureStore
from ..wire import transfer_dtype

SERVICE_KEYS = ("backbone", "family", "fingerprint", "image_size", "mean", "std", "feature_shape", "ks", "num_blocks")


@dataclass
class FitOptions:
    out: Path
    server: str | None = None
    token: str | None = None
    data: str | None = None
    cache: Path | None = None
    k: str = "auto"
    dtype: str = "float16"
    offline: bool = False
    val_fraction: float = 0.2
    train_limit: int | None = None
    val_limit: int | None = None
    num_blocks: int = 4
    qkv_width: int | None = None
    heads: int = 1
    overwrite: bool = False
    retry_seconds: float = RETRY_SECONDS
    fit: FitConfig = field(default_factory=FitConfig)

    @property
    def cache_root(self) -> Path:
        return Path(self.cache) if self.cache else Path(self.out) / "feature-cache"


def fit_edge(options: FitOptions) -> dict[str, Any]:
    """Train and save an edge network; returns a summary (k, scores, top-1, parameters, sizes)."""
    transfer_dtype(options.dtype)
    refuse_overwrite(Path(options.out) / CONFIG_FILE, options.overwrite)
    store, manifest = _offline_manifest(options) if options.offline else _fetch_dataset(options)
    service = manifest["service"]
    ks = _requested_ks(options.k, service["ks"])
    if options.offline:
        _require_cached(store, manifest, ks, options.dtype)
    splits = _splits_reader(store, manifest, options.dtype)
    make_model = _model_factory(service, manifest["classes"], options)
    k_scores: dict[int, float] = {}
    best = ks[0]
    if len(ks) > 1:
        best, k_scores = select_k(ks, make_model, splits, options.fit)
    torch.manual_seed(options.fit.seed)
    model = make_model(best)
    train, val = splits(best)
    history = train_edge(model, train, options.fit, val=val)
    summary = {
        "k": best,
        "k_scores": {str(k): v for k, v in k_scores.items()},
        "top1": history[-1]["top1"],
        "trainable_parameters": count_parameters(model)["trainable"],
        "train_images": len(train),
        "val_images": len(val),
        "dtype": options.dtype,
        "history": history,
    }
    model.config.training = {
        **summary,
        "data": manifest.get("data"),
        "split": manifest.get("split"),
        "cache": str(options.cache_root.resolve()),
        "fit": asdict(options.fit),
    }
    save_edge(model, Path(options.out))
    return {**summary, "out": str(options.out)}


def evaluate_saved_edge(
    model_dir: Path,
    *,
    server: str | None = None,
    token: str | None = None,
    data: str | None = None,
    cache: Path | None = None,
    offline: bool = False,
    batch_size: int = 64,
    retry_seconds: float = RETRY_SECONDS,
) -> dict[str, Any]:
    """Top-1 of a saved edge network on a validation split (the training one by default)."""
    model = load_edge(model_dir)
    config = model.config
    cache_root = Path(cache or config.training.get("cache") or Path(model_dir) / "feature-cache")
    store = FeatureStore(cache_root, config.fingerprint)
    if offline:
        manifest = _checked_manifest(store)
        _check_classes(manifest["classes"], config.classes)
        digests, labels = _column(manifest["val"])
    else:
        with _connected(server, token, config, retry_seconds) as client:
            split = config.training.get("split") or {}
            images = labelled_images(data or config.training.get("data"), **split)
            _check_classes(images.classes, config.classes)
            download_features(client, store, images.val, [config.k], config.dtype, progress=True)
            digests, labels = [i.digest for i in images.val], [i.label for i in images.val]
    _require_digests(store, digests, config.k, config.dtype)
    features = FeatureSet(store, config.k, config.dtype, digests, torch.tensor(labels), (config.tokens, config.width))
    return evaluate_edge(model, features, batch_size)


def predict_files(
    model_dir: Path, paths: list[Path], *, server: str, token: str | None, retry_seconds: float = RETRY_SECONDS
) -> list[dict[str, Any]]:
    """Class and probability for each image file, with features fetched from the service."""
    model = load_edge(model_dir)
    config = model.config
    items = image_files(paths)
    results = []
    with _connected(server, token, config, retry_seconds) as client:
        limits = client.info()["limits"]
        start = 0
        for batch in request_batches(items, limits):
            payload = client.features(batch, [config.k], config.dtype)
            with torch.no_grad():
                probabilities = model(payload.as_float32(config.k)).softmax(dim=1)
            for item, row in zip(items[start : start + len(batch)], probabilities):
                best = int(row.argmax())
                results.append({"image": str(item.path), "label": config.classes[best], "probability": float(row[best])})
            start += len(batch)
    return results


# --- helpers ------------------------------------------------------------------------------------


def _fetch_dataset(options: FitOptions) -> tuple[FeatureStore, dict[str, Any]]:
    """List the data, record it in the cache manifest and fetch every missing feature."""
    if not options.server or not options.data:
        raise DeltaVisionError("edge fit needs --server and --data (or --offline with a filled --cache)")
    split = {"val_fraction": options.val_fraction, "train_limit": options.train_limit,
             "val_limit": options.val_limit, "seed": options.fit.seed}  # fmt: skip
    images = labelled_images(options.data, **split)
    with FeatureClient(options.server, options.token, retry_seconds=options.retry_seconds) as client:
        info = client.info()
        store = FeatureStore(options.cache_root, info["fingerprint"])
        manifest = {
            "data": str(options.data),
            "split": split,
            "classes": images.classes,
            "train": _pairs(images.train),
            "val": _pairs(images.val),
            "service": {key: info[key] for key in SERVICE_KEYS},
        }
        store.write_manifest(manifest)
        ks = _requested_ks(options.k, info["ks"])
        download_features(client, store, images.train + images.val, ks, options.dtype, progress=options.fit.progress)
    return store, manifest


def _offline_manifest(options: FitOptions) -> tuple[FeatureStore, dict[str, Any]]:
    """The store and manifest of the single feature space cached under the cache root."""
    manifests = sorted(options.cache_root.glob(f"*/{MANIFEST}"))
    if not manifests:
        raise DeltaVisionError(f"--offline: no feature cache under {options.cache_root}; run once with --server")
    if len(manifests) > 1:
        raise DeltaVisionError(
            f"--offline: {options.cache_root} holds features of {len(manifests)} services; pass --cache "
            "pointing at a cache with one"
        )
    store = FeatureStore(options.cache_root, manifests[0].parent.name)
    return store, _checked_manifest(store)


def _checked_manifest(store: FeatureStore) -> dict[str, Any]:
    """The cache's manifest, refused (AdapterFileError) unless its classes, splits and labels make sense."""
    manifest = store.read_manifest()
    problem = _manifest_problem(manifest)
    if problem:
        raise AdapterFileError(f"the feature cache manifest {store.folder / MANIFEST} is damaged: {problem}")
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    """What is wrong with a manifest, or None."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("classes"), list) or not manifest["classes"]:
        return "no list of classes"
    classes = len(manifest["classes"])
    for split in ("train", "val"):
        rows = manifest.get(split)
        if not isinstance(rows, list) or not rows:
            return f"no {split} images"
        for row in rows:
            if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str)):
                return f"a {split} entry {str(row)[:60]} is not [digest, label]"
            if not (isinstance(row[1], int) and not isinstance(row[1], bool) and 0 <= row[1] < classes):
                return f"a {split} image has label {row[1]!r}, not one of 0..{classes - 1}"
    service = manifest.get("service")
    if not isinstance(service, dict) or not all(key in service for key in SERVICE_KEYS):
        return "no record of the service that computed the features"
    shape = service["feature_shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)):
        return f"feature shape {shape!r} is not [tokens, width]"
    return None


def _requested_ks(k: str, available: list[int]) -> list[int]:
    if str(k).strip().lower() == "auto":
        return list(available)
    try:
        value = int(k)
    except ValueError:
        value = None
    if value not in available:
        raise DeltaVisionError(f"--k must be 'auto' or one of {available} (the service's candidates), got {k!r}")
    return [value]


def _pairs(items: list[ImageItem]) -> list[list]:
    return [[item.digest, item.label] for item in items]


def _column(pairs: list[list]) -> tuple[list[str], list[int]]:
    return [h for h, _ in pairs], [int(label) for _, label in pairs]


def _splits_reader(store: FeatureStore, manifest: dict[str, Any], dtype: str):
    train_digests, train_labels = _column(manifest["train"])
    val_digests, val_labels = _column(manifest["val"])
    shape = tuple(manifest["service"]["feature_shape"])

    def splits(k: int) -> tuple[FeatureSet, FeatureSet]:
        return (
            FeatureSet(store, k, dtype, train_digests, torch.tensor(train_labels), shape),
            FeatureSet(store, k, dtype, val_digests, torch.tensor(val_labels), shape),
        )

    return splits


def _model_factory(service: dict[str, Any], classes: list[str], options: FitOptions):
    tokens, width = service["feature_shape"]

    def make(k: int) -> EdgeNetwork:
        config = EdgeConfig(
            tokens=tokens, width=width, classes=list(classes), k=k, dtype=options.dtype,
            num_blocks=options.num_blocks, qkv_width=options.qkv_width, heads=options.heads,
            backbone=service["backbone"], fingerprint=service["fingerprint"], service=dict(service),
        )  # fmt: skip
        return EdgeNetwork(config)

    return make


def _require_cached(store: FeatureStore, manifest: dict[str, Any], ks: list[int], dtype: str) -> None:
    digests = _column(manifest["train"])[0] + _column(manifest["val"])[0]
    for k in ks:
        _require_digests(store, digests, k, dtype)


def _require_digests(store: FeatureStore, digests: list[str], k: int, dtype: str) -> None:
    absent = store.missing(digests, [k], dtype)
    damaged = store.damaged(k, dtype)
    if absent and damaged:
        names = ", ".join(path.name for path in damaged[:3]) + (" ..." if len(damaged) > 3 else "")
        raise AdapterFileError(
            f"{len(damaged)} shard(s) of the feature cache {store.folder} fail their checksum ({names}); "
            "run without --offline to fetch their features again"
        )
    if absent:
        raise AdapterFileError(
            f"the feature cache {store.folder} lacks k={k} {dtype} features of {len(absent)} image(s); "
            "run without --offline to fetch them"
        )


def _check_classes(found: list[str], expected: list[str]) -> None:
    if found != expected:
        raise DeltaVisionError(f"the data has classes {found[:5]}..., but the edge model was trained on {expected[:5]}...")


class _connected:
    """A FeatureClient checked to serve the feature space ``config`` was trained on."""

    def __init__(self, server: str | None, token: str | None, config: EdgeConfig, retry_seconds: float = RETRY_SECONDS):
        if not server:
            raise DeltaVisionError("pass --server URL (or --offline to use the feature cache)")
        self.client = FeatureClient(server, token, retry_seconds=retry_seconds)
        self.config = config

    def __enter__(self) -> FeatureClient:
        try:
            fingerprint = self.client.info()["fingerprint"]
        except ServiceError:
            self.client.close()
            raise
        if fingerprint != self.config.fingerprint:
            self.client.close()
            raise DeltaVisionError(
                f"the service at {self.client.url} computes other features (fingerprint {fingerprint}) than "
                f"this edge model was trained on ({self.config.fingerprint}, backbone {self.config.backbone})"
            )
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
