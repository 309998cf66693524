"""The edge commands as functions: fit, evaluate and predict with a feature service (or its cache).

``fit_edge`` lists the dataset's images, fetches each one's Gather_k once into
the local feature cache (resuming whatever an earlier run fetched), chooses k
on the validation split when asked to, trains the LAE and saves it with a
config naming the backbone, k, dtype, feature shape and classes. With
``offline=True`` nothing is fetched: the dataset and its features come from
the cache's manifest and shards alone, checked here before training.

This module holds what both tasks share (the options, listing and fetching the
data, the cache manifest and its checks, the edge network's config) and the
classification path: top-1 evaluation and labels with probabilities. With
``task="segmentation"`` the masks are also kept in the cache (:mod:`.masks`)
and fitting, evaluation and prediction go to :mod:`.segmentation_commands`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import AdapterFileError, DeltaVisionError
from ...io import refuse_overwrite
from ...model.state import count_parameters
from .client import (
    RETRY_SECONDS,
    FeatureClient,
    ImageItem,
    LabelledImages,
    ServiceError,
    connected,
    download_features,
    image_files,
    labelled_images,
    request_batches,
)
from .network import CONFIG_FILE, DECODER_WIDTH, TASKS, EdgeConfig, build_edge, load_edge, save_edge
from .fit import FeatureSet, FitConfig, evaluate_edge, select_k, train_edge
from .masks import SegmentedImages, segmented_images, store_masks
from .segmentation_commands import (
    digest_row_problem,
    digest_rows,
    evaluate_segmentation,
    fit_segmentation,
    require_masks,
)
from .store import MANIFEST, FeatureStore
from ..wire import transfer_dtype

SERVICE_KEYS = ("backbone", "family", "fingerprint", "image_size", "mean", "std", "feature_shape", "ks", "num_blocks")
SEGMENTATION_SERVICE_KEYS = ("grid", "num_prefix_tokens")


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
    task: str = "classification"
    decoder_width: int = DECODER_WIDTH
    fit: FitConfig = field(default_factory=FitConfig)

    @property
    def cache_root(self) -> Path:
        return Path(self.cache) if self.cache else Path(self.out) / "feature-cache"


def fit_edge(options: FitOptions) -> dict[str, Any]:
    """Train and save an edge network; returns a summary (k, scores, top-1, parameters, sizes)."""
    transfer_dtype(options.dtype)
    _check_task(options.task)
    refuse_overwrite(Path(options.out) / CONFIG_FILE, options.overwrite)
    store, manifest = _offline_manifest(options) if options.offline else _fetch_dataset(options)
    _check_manifest_task(manifest, options.task, store)
    service = manifest["service"]
    ks = _requested_ks(options.k, service["ks"])
    if options.offline:
        _require_cached(store, manifest, ks, options.dtype)
    make_model = _model_factory(service, manifest["classes"], options)
    if options.task == "segmentation":
        model, summary = fit_segmentation(store, manifest, ks, make_model, options.fit, options.dtype, options.out)
    else:
        model, summary = _fit_classification(store, manifest, ks, make_model, options)
    model.config.training = {
        **summary,
        "data": manifest.get("data"),
        "split": manifest.get("split"),
        "cache": str(options.cache_root.resolve()),
        "fit": asdict(options.fit),
    }
    save_edge(model, Path(options.out))
    return {**summary, "out": str(options.out)}


def _fit_classification(store: FeatureStore, manifest: dict[str, Any], ks: list[int], make_model, options: FitOptions):
    """(trained classification edge network, summary)."""
    splits = _splits_reader(store, manifest, options.dtype)
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
    return model, summary


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
    """Top-1 (classification) or mIoU, pixel accuracy and ``iou/<class>`` (segmentation) of a saved
    edge network on a validation split (the training one by default); ``images`` counts them."""
    model = load_edge(model_dir)
    config = model.config
    cache_root = Path(cache or config.training.get("cache") or Path(model_dir) / "feature-cache")
    store = FeatureStore(cache_root, config.fingerprint)
    if offline:
        manifest = _checked_manifest(store)
        _check_manifest_task(manifest, config.task, store)
        _check_classes(manifest["classes"], config.classes)
        digests, labels = _digests(manifest["val"]), _labels(manifest["val"])
    else:
        with connected(server, token, config, retry_seconds) as client:
            split = config.training.get("split") or {}
            images = _list_images(data or config.training.get("data"), config.task, split)
            _check_classes(images.classes, config.classes)
            download_features(client, store, images.val, [config.k], config.dtype, progress=True)
            digests, labels = [i.digest for i in images.val], [i.label for i in images.val]
        if config.task == "segmentation":
            store_masks(store, images, digests, config.image_size)
    _require_digests(store, digests, config.k, config.dtype)
    if config.task == "segmentation":
        return evaluate_segmentation(model, store, digests, batch_size)
    features = FeatureSet(store, config.k, config.dtype, digests, torch.tensor(labels), (config.tokens, config.width))
    return evaluate_edge(model, features, batch_size)


def predict_files(
    model_dir: Path, paths: list[Path], *, server: str, token: str | None, retry_seconds: float = RETRY_SECONDS
) -> list[dict[str, Any]]:
    """Class and probability for each image file, with features fetched from the service."""
    model = load_edge(model_dir)
    config = model.config
    if config.task != "classification":
        raise DeltaVisionError(f"{model_dir} holds a {config.task} edge model; it predicts masks, not labels "
                               "(predict_masks, or `deltavision edge predict`)")
    items = image_files(paths)
    results = []
    with connected(server, token, config, retry_seconds) as client:
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


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DeltaVisionError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")


def _manifest_task(manifest: dict[str, Any]) -> str:
    return manifest.get("task", "classification")


def _check_manifest_task(manifest: dict[str, Any], task: str, store: FeatureStore) -> None:
    found = _manifest_task(manifest)
    if found != task:
        raise DeltaVisionError(
            f"the feature cache {store.folder} holds a {found} dataset, not a {task} one; pass --task {found} "
            "or another --cache"
        )


def _list_images(data: str | Path, task: str, split: dict[str, Any]) -> LabelledImages | SegmentedImages:
    """The train/val images of ``data``: labelled for classification, with masks for segmentation."""
    if task == "segmentation":
        return segmented_images(data, **split)
    return labelled_images(data, **split)


def _service_record(info: dict[str, Any], task: str) -> dict[str, Any]:
    """What the manifest keeps of the service; segmentation also needs its token grid."""
    keys = SERVICE_KEYS + (SEGMENTATION_SERVICE_KEYS if task == "segmentation" else ())
    absent = [key for key in keys if key not in info]
    if absent:
        raise ServiceError(f"the feature service does not announce {', '.join(absent)}; update it")
    return {key: info[key] for key in keys}


def _fetch_dataset(options: FitOptions) -> tuple[FeatureStore, dict[str, Any]]:
    """List the data, record it in the cache manifest and fetch every missing feature."""
    if not options.server or not options.data:
        raise DeltaVisionError("edge fit needs --server and --data (or --offline with a filled --cache)")
    split = {"val_fraction": options.val_fraction, "train_limit": options.train_limit,
             "val_limit": options.val_limit, "seed": options.fit.seed}  # fmt: skip
    images = _list_images(options.data, options.task, split)
    segmentation = options.task == "segmentation"
    rows = digest_rows if segmentation else _pairs
    with FeatureClient(options.server, options.token, retry_seconds=options.retry_seconds) as client:
        info = client.info()
        store = FeatureStore(options.cache_root, info["fingerprint"])
        manifest = {
            "task": options.task,
            "data": str(options.data),
            "split": split,
            "classes": images.classes,
            "train": rows(images.train),
            "val": rows(images.val),
            "service": _service_record(info, options.task),
        }
        store.write_manifest(manifest)
        ks = _requested_ks(options.k, info["ks"])
        download_features(client, store, images.train + images.val, ks, options.dtype, progress=options.fit.progress)
    if segmentation:
        digests = [item.digest for item in images.train + images.val]
        store_masks(store, images, digests, info["image_size"], progress=options.fit.progress)
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
    task = _manifest_task(manifest)
    if task not in TASKS:
        return f"unknown task {task!r}"
    classes = len(manifest["classes"])
    for split in ("train", "val"):
        rows = manifest.get(split)
        if not isinstance(rows, list) or not rows:
            return f"no {split} images"
        for row in rows:
            problem = digest_row_problem(row, split) if task == "segmentation" else _pair_problem(row, split, classes)
            if problem:
                return problem
    service = manifest.get("service")
    keys = SERVICE_KEYS + (SEGMENTATION_SERVICE_KEYS if task == "segmentation" else ())
    if not isinstance(service, dict) or not all(key in service for key in keys):
        return "no record of the service that computed the features"
    shape = service["feature_shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)):
        return f"feature shape {shape!r} is not [tokens, width]"
    return None


def _pair_problem(row: Any, split: str, classes: int) -> str | None:
    if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str)):
        return f"a {split} entry {str(row)[:60]} is not [digest, label]"
    if not (isinstance(row[1], int) and not isinstance(row[1], bool) and 0 <= row[1] < classes):
        return f"a {split} image has label {row[1]!r}, not one of 0..{classes - 1}"
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


def _digests(rows: list) -> list[str]:
    """The digests of manifest rows: [digest, label] pairs (classification) or digests (segmentation)."""
    return [row if isinstance(row, str) else row[0] for row in rows]


def _labels(rows: list) -> list[int]:
    return [-1 if isinstance(row, str) else int(row[1]) for row in rows]


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
    dense = {}
    if options.task == "segmentation":
        dense = {"grid": list(service["grid"]), "num_prefix_tokens": service["num_prefix_tokens"],
                 "image_size": service["image_size"], "decoder_width": options.decoder_width}  # fmt: skip

    def make(k: int):
        config = EdgeConfig(
            tokens=tokens, width=width, classes=list(classes), k=k, dtype=options.dtype,
            num_blocks=options.num_blocks, qkv_width=options.qkv_width, heads=options.heads,
            backbone=service["backbone"], fingerprint=service["fingerprint"], service=dict(service),
            task=options.task, **dense,
        )  # fmt: skip
        return build_edge(config)

    return make


def _require_cached(store: FeatureStore, manifest: dict[str, Any], ks: list[int], dtype: str) -> None:
    digests = _digests(manifest["train"]) + _digests(manifest["val"])
    for k in ks:
        _require_digests(store, digests, k, dtype)
    if _manifest_task(manifest) == "segmentation":
        require_masks(store, digests, manifest["service"]["image_size"])


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
