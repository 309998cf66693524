"""The edge side of MIST: LAE (Sec. 3.3), wire format, local feature store, service LRU,
and training that never imports timm."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deltavision.model.state import count_parameters

import deltavision
from deltavision.errors import AdapterFileError, DeltaVisionError
from deltavision.mist.server.cache import FeatureLRU
from deltavision.mist.edge.network import (
    EdgeConfig,
    EdgeNetwork,
    LAEBlock,
    block_parameters,
    default_qkv_width,
    load_edge,
    save_edge,
)
from deltavision.mist.edge.fit import FeatureSet, FitConfig, evaluate_edge, train_edge, warmup_cosine
from deltavision.mist.edge.store import FeatureStore
from deltavision.mist.wire import PayloadError, pack, quantize_int8, to_float32, unpack

TOKENS, WIDTH = 17, 32


def edge_config(**changes) -> EdgeConfig:
    return EdgeConfig(**{"tokens": TOKENS, "width": WIDTH, "classes": ["a", "b", "c"], "k": 2, **changes})


def hashes(count: int, prefix: str = "h") -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(count)]


# --- LAE ------------------------------------------------------------------------------------------


def test_qkv_width_is_16_for_768_wide_features_and_scales_down_to_8():
    assert default_qkv_width(768) == 16
    assert default_qkv_width(1024) == 21
    assert default_qkv_width(192) == 8
    assert edge_config().qkv_width == 8


def test_lae_shapes_parameters_and_the_paper_structure():
    config = EdgeConfig(tokens=197, width=768, classes=[str(i) for i in range(10)], k=12)
    model = EdgeNetwork(config)
    block_params = 768 * 48 + 48 + 16 * 768 + 768 + 2 * 768  # qkv, proj, LayerNorm
    expected = 4 * block_params + 2 * 768 + 768 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == expected
    assert len(model.blocks) == 4
    assert model(torch.randn(2, 197, 768)).shape == (2, 10)


def test_untrained_lae_is_a_linear_probe_on_pooled_normalised_features():
    model = EdgeNetwork(edge_config()).eval()
    features = torch.randn(4, TOKENS, WIDTH) * 3
    expected = model.head(model.norm(features).mean(dim=1))
    torch.testing.assert_close(model(features), expected)


def test_lae_with_heads_and_residual_attention():
    model = EdgeNetwork(edge_config(qkv_width=16, heads=4, num_blocks=2))
    torch.nn.init.normal_(model.blocks[0].attn.proj.weight)
    features = torch.randn(2, TOKENS, WIDTH)
    assert not torch.allclose(model.blocks[0](features), features)
    with pytest.raises(ValueError, match="divisible"):
        edge_config(qkv_width=10, heads=4)


def test_save_and_load_round_trip(tmp_path):
    model = EdgeNetwork(edge_config())
    torch.nn.init.normal_(model.blocks[1].attn.proj.weight)
    save_edge(model, tmp_path / "edge")
    loaded = load_edge(tmp_path / "edge")
    features = torch.randn(3, TOKENS, WIDTH)
    torch.testing.assert_close(loaded(features), model.eval()(features))
    saved = json.loads((tmp_path / "edge" / "edge_config.json").read_text())
    assert saved["k"] == 2 and saved["tokens"] == TOKENS and saved["classes"] == ["a", "b", "c"]
    (tmp_path / "edge" / "edge_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterFileError):
        load_edge(tmp_path / "edge")


@pytest.mark.parametrize("warmup_epochs", [0.0, 1.0, 2.5])
def test_the_edge_schedule_is_timms_cosine_with_warmup(warmup_epochs):
    """The edge's timm-free schedule gives, update by update, the rates of the trainer's timm scheduler."""
    from deltavision.train.recipe import make_scheduler

    config = FitConfig(epochs=4, lr=3e-3, warmup_epochs=warmup_epochs, warmup_lr=1e-5, min_lr=1e-4)
    steps_per_epoch = 5
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=config.lr)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    timm_rates = []
    for update in range(config.epochs * steps_per_epoch + 1):
        scheduler.step_update(update)
        timm_rates.append(optimizer.param_groups[0]["lr"])
    rate = warmup_cosine(config, config.epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch))
    assert [rate(t) for t in range(len(timm_rates))] == pytest.approx(timm_rates, rel=1e-12)
    assert rate(0) == pytest.approx(1e-5 if warmup_epochs else 3e-3) and rate(20) == pytest.approx(1e-4)


# --- wire format ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tolerance", [("float32", 0.0), ("float16", 1e-2), ("int8", None)])
def test_payload_round_trip_per_dtype(dtype, tolerance):
    gathered = {k: torch.randn(3, TOKENS, WIDTH) * (k + 1) for k in (1, 3)}
    data = pack(gathered, dtype, ["x", "y", "z"], {"backbone": "tiny"})
    payload = unpack(data)
    assert payload.ks == [1, 3] and payload.digests == ["x", "y", "z"] and payload.dtype == dtype
    assert payload.metadata["backbone"] == "tiny"
    for k, original in gathered.items():
        assert payload.features[k].dtype == {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}[dtype]
        restored = payload.as_float32(k)
        if dtype == "int8":
            scale = payload.scales[k]
            assert scale.shape == (3,)
            assert ((restored - original).abs().flatten(1).amax(1) <= scale / 2 + 1e-6).all()
        else:
            torch.testing.assert_close(restored, original, rtol=tolerance, atol=tolerance)


def test_int8_quantisation_uses_one_scale_per_image_and_handles_zeros():
    features = torch.stack([torch.zeros(4, 2), torch.full((4, 2), -2.54)])
    quantized, scale = quantize_int8(features)
    assert quantized.dtype == torch.int8 and scale.tolist() == pytest.approx([1.0, 0.02])
    assert quantized[1].eq(-127).all()
    torch.testing.assert_close(to_float32(quantized, scale), features)


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "])
def test_unpack_rejects_foreign_bytes(data):
    with pytest.raises(PayloadError):
        unpack(data)


# --- local feature store --------------------------------------------------------------------------


def test_store_writes_whole_shards_and_reads_rows_in_any_order(tmp_path):
    store = FeatureStore(tmp_path, "fp1")
    first, second = torch.randn(4, TOKENS, WIDTH), torch.randn(3, TOKENS, WIDTH)
    store.write_shard(2, "float32", hashes(4, "a"), first, None)
    store.write_shard(2, "float32", hashes(3, "b"), second, None)
    wanted = ["b0002", "a0000", "a0003", "b0000"]
    expected = torch.stack([second[2], first[0], first[3], second[0]])
    torch.testing.assert_close(store.read(2, "float32", wanted), expected)
    reopened = FeatureStore(tmp_path, "fp1")  # the index is rebuilt from the shards' own metadata
    torch.testing.assert_close(reopened.read(2, "float32", wanted), expected)
    assert reopened.missing(wanted + ["c0000", "a0000"], [2], "float32") == ["c0000"]
    assert reopened.missing(wanted, [2, 3], "float32") == wanted
    assert reopened.available_ks(wanted, "float32") == [2]
    assert not list(tmp_path.rglob("*.tmp"))


def test_store_keeps_int8_scales_and_ignores_damaged_shards(tmp_path):
    store = FeatureStore(tmp_path, "fp1")
    original = torch.randn(2, TOKENS, WIDTH)
    quantized, scale = quantize_int8(original)
    path = store.write_shard(1, "int8", ["p", "q"], quantized, scale)
    restored = store.read(1, "int8", ["q", "p"])
    torch.testing.assert_close(restored, to_float32(quantized, scale)[[1, 0]])
    path.write_bytes(path.read_bytes()[:40])
    assert FeatureStore(tmp_path, "fp1").missing(["p", "q"], [1], "int8") == ["p", "q"]
    with pytest.raises(AdapterFileError, match="no k=1"):
        FeatureStore(tmp_path, "fp1").read(1, "int8", ["p"])


def test_feature_spaces_of_different_services_stay_apart(tmp_path):
    FeatureStore(tmp_path, "fp1").write_shard(1, "float16", ["p"], torch.zeros(1, 2, 2, dtype=torch.float16), None)
    assert FeatureStore(tmp_path, "fp2").missing(["p"], [1], "float16") == ["p"]


# --- service LRU ----------------------------------------------------------------------------------


def test_lru_is_bounded_by_bytes_and_evicts_least_recently_used():
    entry = lambda: {1: torch.zeros(10), 2: torch.zeros(15)}  # noqa: E731  100 bytes
    cache = FeatureLRU(max_bytes=250)
    cache.keep("a", entry())
    cache.keep("b", entry())
    assert cache.get("a") is not None  # a is now the most recent
    cache.keep("c", entry())
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.bytes == 200 and cache.stats()["hits"] == 1
    assert cache.get("zz") is None and cache.misses == 1
    cache.keep("huge", {1: torch.zeros(100)})
    assert "huge" not in cache and len(cache) == 2


def test_lru_keeps_the_first_answer_for_a_digest():
    cache = FeatureLRU(max_bytes=1000)
    first = {1: torch.zeros(10)}
    assert cache.keep("a", first) is first
    assert cache.keep("a", {1: torch.ones(10)}) is first and cache.get("a") is first


@pytest.mark.parametrize("width, qkv_width, heads", [(768, 16, 1), (768, 16, 4), (768, 30, 1), (32, 8, 2), (192, 8, 1)])
def test_lae_block_parameters_follow_the_formula(width, qkv_width, heads):
    assert count_parameters(LAEBlock(width, qkv_width, heads))["trainable"] == block_parameters(width, qkv_width)


def test_lae_parameter_counts_against_the_paper():
    """The text's block (r = 16) at C = 768, and the width that reproduces Table 4 (r = 30)."""
    assert block_parameters(768, 16) == 51_504  # LN 1,536 + QKV 36,912 + output 13,056
    assert round(4 * block_parameters(768, 30) / 1e6, 2) == 0.38 and round(8 * block_parameters(768, 30) / 1e6, 2) == 0.76
    assert round(12 * block_parameters(768, 16) / 1e6 + 769 * 49.5 / 1e6, 2) == 0.66  # LAST in MIST's Table 1
    network = EdgeNetwork(EdgeConfig(tokens=197, width=768, classes=["a", "b"], k=12))
    assert count_parameters(network)["trainable"] == 4 * 51_504 + 2 * 768 + (768 * 2 + 2)


# --- training on stored features ------------------------------------------------------------------


def separable_store(root: Path, count: int = 48) -> tuple[FeatureStore, list[str], torch.Tensor]:
    """Features whose class shifts one channel: a task the edge network must learn."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(count) % 3
    features = torch.randn(count, TOKENS, WIDTH, generator=generator)
    features[:, :, :3] += 3.0 * torch.nn.functional.one_hot(labels, 3)[:, None, :]
    store = FeatureStore(root, "fp")
    names = hashes(count)
    store.write_shard(2, "float16", names, features.half(), None)
    return store, names, labels


def test_edge_training_learns_from_stored_features(tmp_path):
    store, names, labels = separable_store(tmp_path)
    data = FeatureSet(store, 2, "float16", names, labels)
    torch.manual_seed(0)
    model = EdgeNetwork(edge_config(dtype="float16"))
    before = evaluate_edge(model, data)
    history = train_edge(model, data, FitConfig(epochs=6, batch_size=16, lr=1e-2, progress=False), val=data)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["top1"] > before["top1"] and history[-1]["top1"] >= 90.0


NO_TIMM_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys, types

    class RefuseTimm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "timm" or name.startswith("timm."):
                raise ImportError("an edge device has no timm")
            return None

    sys.meta_path.insert(0, RefuseTimm())
    # deltavision/__init__ re-exports the model-building API; an edge needs only the serve
    # package, so the package is entered without running that __init__.
    package = types.ModuleType("deltavision")
    package.__path__ = [sys.argv[1]]
    sys.modules["deltavision"] = package

    import torch
    from deltavision.mist.edge.client import labelled_images
    from deltavision.mist.edge.fit import FitConfig
    from deltavision.mist.edge.store import FeatureStore
    from deltavision.mist.edge.commands import FitOptions, fit_edge
    from deltavision.mist.edge.network import load_edge
    from deltavision.memory import release_large_blocks

    applied = release_large_blocks()  # what the edge CLI does first
    root, out = sys.argv[2], sys.argv[3]
    images = labelled_images(sys.argv[4], val_fraction=0.2)  # what `edge fetch` sends: untransformed images
    generator = torch.Generator().manual_seed(0)
    labels = [i % 2 for i in range(24)]
    store = FeatureStore(root, "fp")
    names = [f"img{i}" for i in range(24)]
    for k in (1, 2):
        features = torch.randn(24, 5, 16, generator=generator) + torch.tensor(labels)[:, None, None]
        store.write_shard(k, "float16", names, features.half(), None)
    service = {"backbone": "vit_base_patch16_224", "family": "vit", "fingerprint": "fp", "image_size": 224,
               "mean": [0.5] * 3, "std": [0.5] * 3, "feature_shape": [5, 16], "ks": [1, 2], "num_blocks": 2}
    pairs = [[n, l] for n, l in zip(names, labels)]
    store.write_manifest({"classes": ["even", "odd"], "train": pairs[:16], "val": pairs[16:], "service": service})
    import deltavision.mist, deltavision.mist.cli, deltavision.mist.edge.client, deltavision.mist.edge.commands  # noqa: E401
    summary = fit_edge(FitOptions(out=out, cache=root, offline=True, k="auto", dtype="float16",
                                  fit=FitConfig(epochs=2, select_epochs=1, progress=False)))
    model = load_edge(out)
    logits = model(store.read(summary["k"], "float16", names[:3]))

    # segmentation: a tiny images/ + masks/ folder read and its masks stored on the edge, then an offline fit
    import numpy as np
    from pathlib import Path
    from PIL import Image
    from deltavision.mist.edge.masks import segmented_images, store_masks

    folder = Path(sys.argv[7])
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    (folder / "classes.txt").write_text(chr(10).join(["background", "square"]))
    rng = np.random.default_rng(0)
    for i in range(10):
        mask = np.zeros((20, 20), np.uint8)
        mask[5:15, 5:15] = 1
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{i}.png")
    seg_images = segmented_images(folder, val_fraction=0.3)
    seg_root, seg_out = sys.argv[5], sys.argv[6]
    seg_store = FeatureStore(seg_root, "fp-seg")
    digests = [item.digest for item in seg_images.train + seg_images.val]
    seg_store.write_shard(4, "float16", digests, torch.randn(len(digests), 17, 16, generator=generator).half(), None)
    store_masks(seg_store, seg_images, digests, 32, progress=False)
    seg_service = {**service, "fingerprint": "fp-seg", "image_size": 32, "feature_shape": [17, 16], "ks": [4],
                   "num_blocks": 4, "grid": [4, 4], "num_prefix_tokens": 1}
    seg_store.write_manifest({"task": "segmentation", "classes": seg_images.classes, "service": seg_service,
                              "train": [i.digest for i in seg_images.train], "val": [i.digest for i in seg_images.val]})
    seg = fit_edge(FitOptions(out=seg_out, cache=seg_root, offline=True, task="segmentation", k="4", dtype="float16",
                              fit=FitConfig(epochs=1, batch_size=4, progress=False)))
    seg_logits = load_edge(seg_out)(seg_store.read(4, "float16", digests[:2]))
    seg_log = (Path(seg_out) / "log.csv").read_text().splitlines()[0].split(",")
    print(json.dumps({"applied": applied, "listed": [len(images.train), len(images.val)], "k": summary["k"], "scores": summary["k_scores"], "shape": list(logits.shape),
                      "seg_shape": list(seg_logits.shape), "seg_log": seg_log, "seg_miou": seg["miou"],
                      "seg_data": "deltavision.data.segmentation" in sys.modules,
                      "timm": sorted(m for m in sys.modules if m == "timm" or m.startswith("timm.")),
                      "server": sorted(m for m in sys.modules if m.startswith("deltavision.mist.server")),
                      "building": sorted(m for m in sys.modules if m in ("deltavision.model.build", "deltavision.methods",
                                                                         "deltavision.backbones", "deltavision.anatomy")),
                      "trainer": "deltavision.train.loop" in sys.modules}))
    """
)


def test_edge_trains_and_predicts_offline_without_timm(tmp_path):
    """A fresh interpreter where importing timm fails lists an image folder, fits (with k selection), saves,
    loads and predicts; then reads a segmentation folder, stores its masks and fits, saves and runs a
    segmentation edge network."""
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(5):
            Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(tmp_path / "images" / label / f"{index}.png")
    package_dir = str(Path(deltavision.__file__).parent)
    result = subprocess.run(
        [sys.executable, "-c", NO_TIMM_SCRIPT, package_dir, str(tmp_path / "cache"), str(tmp_path / "edge"),
         str(tmp_path / "images"), str(tmp_path / "seg-cache"), str(tmp_path / "seg-edge"), str(tmp_path / "scenes")],
        capture_output=True, text=True, timeout=240, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["timm"] == [] and report["building"] == [] and report["server"] == []
    assert report["trainer"] is True  # the edge trains with the classification trainer's pieces
    assert report["k"] in (1, 2) and set(report["scores"]) == {"1", "2"}
    assert report["shape"] == [3, 2] and report["listed"] == [8, 2]
    assert report["applied"] is sys.platform.startswith("linux")
    assert report["seg_shape"] == [2, 2, 32, 32] and report["seg_data"] is True
    assert {"miou", "pixel_acc", "iou/background", "iou/square"} <= set(report["seg_log"]) and report["seg_miou"] >= 0


# --- damaged or tampered feature caches -----------------------------------------------------------

SERVICE = {"backbone": "vit_base_patch16_224", "family": "vit", "fingerprint": "fp", "image_size": 224,
           "mean": [0.5] * 3, "std": [0.5] * 3, "feature_shape": [TOKENS, WIDTH], "ks": [1, 2], "num_blocks": 2}  # fmt: skip


def offline_cache(root: Path, count: int = 24, per_shard: int = 6) -> tuple[FeatureStore, list[str]]:
    """A filled feature cache (k = 1 and 2, float16, shards of ``per_shard``) with its manifest."""
    store, names = FeatureStore(root, "fp"), hashes(count)
    labels = [i % 2 for i in range(count)]
    generator = torch.Generator().manual_seed(0)
    for k in (1, 2):
        features = torch.randn(count, TOKENS, WIDTH, generator=generator) + torch.tensor(labels)[:, None, None]
        for start in range(0, count, per_shard):
            store.write_shard(k, "float16", names[start : start + per_shard], features[start : start + per_shard].half(), None)
    pairs = [[n, label] for n, label in zip(names, labels)]
    store.write_manifest({"classes": ["even", "odd"], "train": pairs[:16], "val": pairs[16:], "service": SERVICE})
    return store, names


def fit_offline(root: Path, out: Path, **changes):
    from deltavision.mist.edge.commands import FitOptions, fit_edge

    options = dict(out=out, cache=root, offline=True, k="2", dtype="float16",
                   fit=FitConfig(epochs=1, select_epochs=1, progress=False))  # fmt: skip
    return fit_edge(FitOptions(**{**options, **changes}))


def overwrite_tail(path: Path, value: int, count: int = 256) -> None:
    data = bytearray(path.read_bytes())
    data[-count:] = bytes([value]) * count
    path.write_bytes(bytes(data))


def first_shard(root: Path, k: int = 2) -> Path:
    return sorted((root / "fp" / f"k{k}-float16").glob("*.safetensors"))[0]


@pytest.mark.parametrize("value", [0xFF, 0x00], ids=["bytes flipped to NaN", "bytes flipped to finite values"])
def test_a_damaged_shard_is_detected_by_its_checksum(tmp_path, value):
    store, _ = offline_cache(tmp_path / "cache")
    overwrite_tail(first_shard(tmp_path / "cache"), value)
    with pytest.raises(AdapterFileError, match="fail their checksum"):
        fit_offline(tmp_path / "cache", tmp_path / "edge")
    assert not (tmp_path / "edge" / "edge_model.safetensors").exists()
    assert FeatureStore(tmp_path / "cache", "fp").damaged(2, "float16") == [first_shard(tmp_path / "cache")]


def test_online_the_images_of_a_damaged_shard_are_fetched_again(tmp_path):
    from deltavision.mist.edge.client import download_features, image_item
    from deltavision.mist.wire import unpack as parse

    class FakeService:
        """A feature service in-process: random features, remembering which images it was sent."""

        def __init__(self):
            self.sent = []

        def info(self):
            return {**SERVICE, "limits": {"max_images": 6, "max_body_bytes": 10**6}}

        def features(self, images, ks, dtype):
            from deltavision.mist.wire import digest

            self.sent += [digest(data) for data in images]
            gathered = {k: torch.randn(len(images), TOKENS, WIDTH) for k in ks}
            return parse(pack(gathered, dtype, [digest(data) for data in images], {}))

    items = [image_item(i % 2, encoded=f"image {i}".encode()) for i in range(12)]
    store = FeatureStore(tmp_path / "cache", "fp")
    service = FakeService()
    assert download_features(service, store, items, [2], "float16", progress=False) == 12
    damaged = first_shard(tmp_path / "cache")
    overwrite_tail(damaged, 0xFF)
    service.sent.clear()
    fresh = FeatureStore(tmp_path / "cache", "fp")
    assert download_features(service, fresh, items, [2], "float16", progress=False) == 6
    assert set(service.sent) == {item.digest for item in items[:6]} or set(service.sent) == {item.digest for item in items[6:]}
    assert fresh.damaged(2, "float16") == [] and fresh.missing([i.digest for i in items], [2], "float16") == []
    assert torch.isfinite(fresh.read(2, "float16", [i.digest for i in items])).all()


def test_tampered_shapes_and_labels_are_clear_errors(tmp_path):
    store, names = offline_cache(tmp_path / "cache")
    store.write_shard(2, "float16", names[:6], torch.zeros(6, TOKENS + 3, WIDTH).half(), None)  # a sound shard, other shape
    with pytest.raises(AdapterFileError, match=r"shape \(20, 32\).*\(17, 32\)"):
        fit_offline(tmp_path / "cache", tmp_path / "edge")

    store, _ = offline_cache(tmp_path / "labels")
    manifest = json.loads((tmp_path / "labels" / "fp" / "manifest.json").read_text())
    for label, expected in ((7, "label 7"), ("x", "label 'x'"), (-1, "label -1")):
        manifest["train"][3][1] = label
        (tmp_path / "labels" / "fp" / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(AdapterFileError, match=expected):
            fit_offline(tmp_path / "labels", tmp_path / "edge")


def test_non_finite_values_in_a_sound_shard_are_refused_when_read(tmp_path):
    store = FeatureStore(tmp_path, "fp")
    features = torch.zeros(2, TOKENS, WIDTH)
    features[1, 3, 4] = float("nan")
    store.write_shard(1, "float32", ["a", "b"], features, None)
    assert store.read(1, "float32", ["a"]).shape == (1, TOKENS, WIDTH)
    with pytest.raises(AdapterFileError, match="non-finite"):
        store.read(1, "float32", ["b"])


def test_training_stops_on_a_non_finite_loss():
    from deltavision.mist.edge.fit import NonFiniteLossError

    class PoisonedFeatures:
        k = 2

        def __len__(self):
            return 8

        def batches(self, batch_size, generator=None):
            yield torch.randn(4, TOKENS, WIDTH), torch.zeros(4, dtype=torch.long)
            yield torch.full((4, TOKENS, WIDTH), float("nan")), torch.zeros(4, dtype=torch.long)

    with pytest.raises(NonFiniteLossError, match="epoch 1, step 2"):
        train_edge(EdgeNetwork(edge_config()), PoisonedFeatures(), FitConfig(epochs=1, batch_size=4, progress=False))


@pytest.mark.parametrize("tamper", ["flipped bytes", "labels"])
def test_the_cli_reports_a_damaged_cache_in_one_line(tmp_path, monkeypatch, capsys, tamper):
    from deltavision.mist.cli import main

    store, _ = offline_cache(tmp_path / "cache")
    if tamper == "flipped bytes":
        overwrite_tail(first_shard(tmp_path / "cache"), 0xFF)
    else:
        manifest = store.read_manifest()
        manifest["val"][0][1] = 9
        (tmp_path / "cache" / "fp" / "manifest.json").write_text(json.dumps(manifest))
    argv = ["mist", "edge", "fit", "--offline", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "edge"),
            "--k", "2", "--epochs", "1", "--no-low-memory"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    assert exited.value.code == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err


# --- the client rides out a service restart ---------------------------------------------------------


def test_the_client_retries_with_exponential_backoff_until_its_deadline():
    import httpx

    from deltavision.mist.edge.client import FeatureClient, ServiceError

    now, waits = [0.0], []

    def sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    def service_restarting_for(seconds):
        def handle(request):
            if now[0] < seconds:
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(200, json={"fingerprint": "fp"})

        return httpx.MockTransport(handle)

    client = FeatureClient("http://service", "t" * 16, transport=service_restarting_for(20.0), sleep=sleep,
                           clock=lambda: now[0])  # fmt: skip
    assert client.info() == {"fingerprint": "fp"}  # a 20 s restart is ridden out (the default is 60 s)
    assert waits[:6] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0] and max(waits) == 8.0 and 20.0 <= now[0] < 28.0

    now[0], waits[:] = 0.0, []
    gone = FeatureClient("http://service", "t" * 16, retry_seconds=10, transport=service_restarting_for(1e9),
                         sleep=sleep, clock=lambda: now[0])  # fmt: skip
    with pytest.raises(ServiceError, match="after retrying for 10 s"):
        gone.info()
    assert now[0] <= 10.0 and len(waits) >= 5


def test_request_batches_respect_the_services_pixel_budget():
    import io as bytes_io

    from PIL import Image

    from deltavision.mist.edge.client import image_item, request_batches

    def blank(width, height):
        buffer = bytes_io.BytesIO()
        Image.new("L", (width, height)).save(buffer, format="PNG")
        return buffer.getvalue()

    items = [image_item(0, encoded=blank(100, 100 + i)) for i in range(5)]  # ~10,000 pixels each
    limits = {"max_images": 64, "max_body_bytes": 10**6, "max_request_pixels": 25_000}
    assert [len(batch) for batch in request_batches(items, limits)] == [2, 2, 1]
    del limits["max_request_pixels"]  # a service from before the budget existed
    assert [len(batch) for batch in request_batches(items, limits)] == [5]


# --- segmentation on the edge (the paper's SegFormer setting, appendix Sec. 8) ----------------------

GRID, PREFIX, SIZE = (4, 4), 1, 32


def segmentation_config(**changes) -> EdgeConfig:
    return edge_config(**{"task": "segmentation", "grid": list(GRID), "num_prefix_tokens": PREFIX, "image_size": SIZE,
                          "decoder_width": 16, **changes})  # fmt: skip


def test_segmentation_edge_network_gives_logits_at_the_input_size_from_the_grid_tokens():
    from deltavision.mist.edge.network import SegmentationEdgeNetwork, build_edge

    model = build_edge(segmentation_config()).eval()
    assert isinstance(model, SegmentationEdgeNetwork)
    features = torch.randn(2, TOKENS, WIDTH)
    logits = model(features)
    assert logits.shape == (2, 3, SIZE, SIZE)
    changed = features.clone()
    changed[:, 0] = torch.randn(2, WIDTH)  # the class token: dropped before the decoder (untrained LAE = identity)
    torch.testing.assert_close(model(changed), logits)
    changed[:, PREFIX + 5] = torch.randn(2, WIDTH)  # grid cell (1, 1) (row-major): changes the logits near it only
    difference = (model(changed) - logits).abs().sum(dim=(0, 1))
    cell = SIZE // GRID[0]
    assert difference[cell : 2 * cell, cell : 2 * cell].min() > 0
    assert difference[-cell // 2 :, -cell // 2 :].max() == 0  # cell (3, 3)'s far half: its 3x3 conv misses cell (1, 1)
    with pytest.raises(ValueError, match="prefix tokens plus"):
        segmentation_config(grid=[5, 4])


def test_tokens_to_map_inverts_the_services_token_layout():
    from deltavision.anatomy.layout import Grid, join_tokens, to_tokens
    from deltavision.mist.edge.network import tokens_to_map

    patch_map = torch.randn(2, WIDTH, 3, 5)
    assert torch.equal(tokens_to_map(to_tokens(patch_map, "nchw"), 0, (3, 5)), patch_map)
    assert torch.equal(tokens_to_map(to_tokens(patch_map.permute(0, 2, 3, 1), "nhwc"), 0, (3, 5)), patch_map)
    prefix = torch.randn(2, 2, WIDTH)
    vit_tokens = join_tokens(prefix, patch_map, Grid("tokens", 3, 5, 2))
    assert torch.equal(tokens_to_map(vit_tokens, 2, (3, 5)), patch_map)


def test_segmentation_edge_round_trip_records_the_task(tmp_path):
    from deltavision.mist.edge.network import SegmentationEdgeNetwork, build_edge

    model = build_edge(segmentation_config())
    model.train()(torch.randn(4, TOKENS, WIDTH))  # moves the BatchNorm statistics
    torch.nn.init.normal_(model.blocks[0].attn.proj.weight)
    save_edge(model, tmp_path / "edge")
    saved = json.loads((tmp_path / "edge" / "edge_config.json").read_text())
    assert saved["task"] == "segmentation" and saved["grid"] == list(GRID) and saved["image_size"] == SIZE
    loaded = load_edge(tmp_path / "edge")
    assert isinstance(loaded, SegmentationEdgeNetwork)
    features = torch.randn(2, TOKENS, WIDTH)
    torch.testing.assert_close(loaded(features), model.eval()(features))
    saved["grid"] = [9, 9]
    (tmp_path / "edge" / "edge_config.json").write_text(json.dumps(saved))
    with pytest.raises(AdapterFileError, match="prefix tokens plus"):
        load_edge(tmp_path / "edge")


def test_mask_store_keeps_rows_in_order_and_refuses_damaged_or_foreign_labels(tmp_path):
    store = FeatureStore(tmp_path, "fp")
    masks = torch.randint(0, 3, (5, 8, 8), dtype=torch.uint8)
    masks[2, 0, 0] = 255
    path = store.write_masks(8, hashes(5), masks)
    reopened = FeatureStore(tmp_path, "fp")
    read = reopened.read_masks(8, ["h0004", "h0002", "h0000"], num_classes=3)
    assert read.dtype == torch.int64 and torch.equal(read, masks[[4, 2, 0]].long())
    assert reopened.missing_masks(hashes(6), 8) == ["h0005"] and reopened.missing_masks(hashes(5), 16) == hashes(5)
    with pytest.raises(AdapterFileError, match="label 2, but there are 2 classes"):
        reopened.read_masks(8, ["h0001"], num_classes=2)
    overwrite_tail(path, 0x07, count=64)
    damaged = FeatureStore(tmp_path, "fp")
    assert damaged.missing_masks(hashes(5), 8) == hashes(5) and damaged.damaged_masks(8) == [path]


def test_masks_are_resized_with_nearest_neighbour():
    import numpy as np

    from deltavision.mist.edge.masks import resize_mask

    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[:20, :30], mask[20:, 30:] = 3, 255
    resized = resize_mask(mask, 16)
    assert resized.shape == (16, 16) and resized.dtype == torch.uint8
    assert set(resized.unique().tolist()) == {0, 3, 255}  # no blended labels
    assert resized[:8, :8].eq(3).all() and resized[8:, 8:].eq(255).all() and resized[:8, 8:].eq(0).all()


def test_fashion_scenes_are_sent_as_png_with_their_own_masks():
    import io as bytes_io

    import numpy as np
    from PIL import Image

    from deltavision.data.scenes import load_scenes
    from deltavision.mist.edge.masks import segmented_images

    images = segmented_images("fashion-scenes", train_limit=3, val_limit=2)
    assert len(images.train) == 3 and len(images.val) == 2 and images.classes[0] == "background"
    scenes = load_scenes("val", 2)
    for item, pixels, mask in zip(images.val, scenes.images, scenes.semantic_masks()):
        assert np.array_equal(np.asarray(Image.open(bytes_io.BytesIO(item.read()))), pixels)
        assert np.array_equal(images.masks[item.digest](), mask)


def grid_task_cache(root: Path, count: int = 32) -> tuple[FeatureStore, list[str]]:
    """Features whose grid tokens say their cell's class (channel c lit), masks the cells upsampled."""
    generator = torch.Generator().manual_seed(0)
    cells = torch.randint(0, 3, (count, *GRID), generator=generator)
    features = torch.randn(count, TOKENS, WIDTH, generator=generator) * 0.5
    features[:, PREFIX:, :3] += 3.0 * torch.nn.functional.one_hot(cells.flatten(1), 3)
    masks = cells.repeat_interleave(SIZE // GRID[0], 1).repeat_interleave(SIZE // GRID[1], 2).to(torch.uint8)
    store, names = FeatureStore(root, "fp"), hashes(count)
    store.write_shard(2, "float16", names, features.half(), None)
    store.write_masks(SIZE, names, masks)
    return store, names


def test_segmentation_edge_learns_and_logs_miou_per_epoch(tmp_path):
    import csv

    from deltavision.mist.edge.fit import MaskedFeatureSet, evaluate_segmentation_edge, train_segmentation_edge
    from deltavision.mist.edge.network import build_edge

    store, names = grid_task_cache(tmp_path / "cache")
    train_set = MaskedFeatureSet(store, 2, "float16", names[:24], SIZE, 3, (TOKENS, WIDTH))
    val = MaskedFeatureSet(store, 2, "float16", names[24:], SIZE, 3, (TOKENS, WIDTH))
    torch.manual_seed(0)
    model = build_edge(segmentation_config(dtype="float16"))
    before = evaluate_segmentation_edge(model, val)
    config = FitConfig(epochs=4, batch_size=8, lr=1e-2, progress=False, warmup_epochs=0.5)
    history = train_segmentation_edge(model, train_set, val, config, tmp_path / "run")
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").read_text().splitlines()))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4]
    assert {"miou", "pixel_acc", "iou/a", "iou/b", "iou/c"} <= set(rows[0])
    assert float(rows[-1]["miou"]) == pytest.approx(history[-1]["miou"])
    assert history[-1]["miou"] > max(60.0, before["miou"] + 20.0), (before, history[-1])


def test_offline_segmentation_fit_refuses_a_classification_cache(tmp_path):
    offline_cache(tmp_path / "cache")
    with pytest.raises(DeltaVisionError, match="holds a classification dataset.*--task classification"):
        fit_offline(tmp_path / "cache", tmp_path / "edge", task="segmentation")


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_edge_predict_refuses_a_model_of_the_other_task_before_connecting(task, tmp_path):
    from deltavision.mist.edge.commands import predict_files
    from deltavision.mist.edge.network import build_edge
    from deltavision.mist.edge.segmentation_commands import predict_masks

    segmentation = dict(task="segmentation", tokens=1 + 16, grid=[4, 4], num_prefix_tokens=1, image_size=32)
    config = edge_config(**(segmentation if task == "segmentation" else {}))
    folder = save_edge(build_edge(config), tmp_path / "edge")
    image = tmp_path / "a.png"
    image.write_bytes(b"not read")
    wrong = predict_files if task == "segmentation" else predict_masks
    kwargs = {} if task == "segmentation" else {"out": tmp_path / "masks"}
    expected = "predicts masks, not labels" if task == "segmentation" else "predicts labels, not masks"
    with pytest.raises(DeltaVisionError, match=expected):  # the service address is never reached
        wrong(folder, [image], server="http://127.0.0.1:9", token=None, retry_seconds=0, **kwargs)
