"""MIST separated tuning, measured: transfer bytes, edge memory, service throughput, accuracy.

1. **Transfer bytes per image** for each transfer dtype, as the feature service
   actually answers (response bytes of an 8-image request through the ASGI app,
   divided by 8), next to side-tuning-style transfer of every block output
   (z_0..z_N as one safetensors file per image). On vit_base_patch16_224
   (random init; sizes do not depend on weights) and on the embedded
   tf_efficientnet_lite0 at 224 px and at the 64 px used for accuracy.
2. **Edge peak memory**: a fresh process per mode imports the edge modules,
   reads its peak RSS (``getrusage``), then fine-tunes the LAE for one epoch at
   batch 32 (or predicts at batch 32) on ViT-B/16-shaped features (197 x 768,
   float16, read from a local feature store on disk) and reports the growth of
   the peak over that post-import baseline. Targets: < 500 MB and < 200 MB.
3. **Service throughput**: a service process (``python -m deltavision.mist
   serve``) under concurrent client threads on loopback, each request carrying
   distinct real JPEG photos (sklearn sample images, random crops), bounded in
   request count; images/s and per-request p50/p99 latency. The reference is
   the same Gather pass run in one process on ready tensors at the service's
   batch size (fresh process, before and after the service run; their mean).
   Target ratio >= 0.9.
4. **Accuracy on real data**: real pretrained EfficientNet-Lite0 on real
   Fashion-MNIST (64 px, 2000 train / 1000 val): the edge network for every
   candidate k, with k chosen automatically, with float16 and int8 transfer, and
   without LAE blocks; against linear probing (``deltavision`` method
   "linear" through ``run_training``) with the same epochs, batch, optimizer and
   schedule.

Usage: ``python benchmarks/mist.py [--quick] [--out benchmarks/results]``
(about 10-15 minutes on a shared 2-core CPU; --quick is a smoke test).
Writes mist.md, mist.csv and mist.png.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

TOKEN = "benchmark-token-0123456789"
VIT_B = "vit_base_patch16_224"
EMBEDDED = "tf_efficientnet_lite0"
MIB = 2**20
MEMORY_TARGETS_MB = {"train": 500, "predict": 200}
THROUGHPUT_TARGET = 0.9
TRAIN_EPOCHS = 2  # of the memory measurement: enough steps for allocator growth to show
ALLOCATORS = {"low-memory": "edge CLI default (--low-memory)", "glibc": "plain glibc malloc (--no-low-memory)"}
RESULT_TAG = "RESULT "


def log(message: str) -> None:
    print(f"[mist {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB.

    Linux: VmRSS and VmHWM of /proc/self/status. Not ru_maxrss: a child started by
    subprocess (vfork + exec) inherits its parent's ru_maxrss, which would hide the
    child's own peak whenever the parent was bigger.
    """
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = (peak if sys.platform == "darwin" else peak * 1024) / MIB
        return peak_mb, peak_mb


def reset_peak_rss() -> None:
    """Make VmHWM restart from the current RSS (Linux >= 4.0); harmless elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def edge_only_imports(package_dir: str) -> None:
    """Make this process look like an edge device: importing timm fails, and the deltavision
    package is entered without its __init__ (which re-exports the backbone-building API)."""
    import importlib.abc
    import types

    class RefuseTimm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "timm" or name.startswith("timm."):
                raise ImportError("the edge process has no timm")
            return None

    sys.meta_path.insert(0, RefuseTimm())
    package = types.ModuleType("deltavision")
    package.__path__ = [package_dir]
    sys.modules["deltavision"] = package


def atomic_write(path: Path, write) -> None:
    from deltavision.io import atomic_write as write_atomically

    write_atomically(path, write)


def photos(count: int, size: int, seed: int) -> list[bytes]:
    """Distinct JPEG crops of scikit-learn's two sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sources = load_sample_images().images
    rng = np.random.default_rng(seed)
    made = []
    for index in range(count):
        source = sources[index % len(sources)]
        top = rng.integers(0, source.shape[0] - size)
        left = rng.integers(0, source.shape[1] - size)
        buffer = io.BytesIO()
        Image.fromarray(source[top : top + size, left : left + size]).save(buffer, format="JPEG", quality=90)
        made.append(buffer.getvalue())
    return made


DEVICE_ARGS = ["cpu", "fp32"]  # --device, --precision of the service sections


def run_worker(*args: str, threads: int | None = None) -> dict:
    """Run this script as ``--worker ...`` in a fresh process and return its RESULT line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env, timeout=900)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"worker {args} failed:\n{done.stderr[-3000:]}")


# --- 1. transfer bytes ---------------------------------------------------------------------------


def side_tuning_bytes(model: torch.nn.Module, image: torch.Tensor) -> int:
    """Bytes of one image's embedding output and every block output, float32, as safetensors."""
    from safetensors.torch import save

    from deltavision.anatomy import describe

    anatomy = describe(model)
    outputs: dict[str, torch.Tensor] = {}
    first = model.get_submodule(anatomy.blocks[0].name)
    handles = [first.register_forward_pre_hook(lambda module, args: outputs.setdefault("z0", args[0].clone()))]
    for block in anatomy.blocks:
        module = model.get_submodule(block.name)
        handles.append(module.register_forward_hook(lambda m, a, out, name=block.name: outputs.setdefault(name, out.clone())))
    with torch.inference_mode():
        model.forward_features(image)
    for handle in handles:
        handle.remove()
    return len(save({name: t.contiguous() for name, t in outputs.items()}))


def transfer_rows(backbone: str, image_size: int, pretrained: bool) -> list[dict]:
    from fastapi.testclient import TestClient

    from deltavision.backbones import create_backbone
    from deltavision.mist.server.app import create_app
    from deltavision.mist.server.service import FeatureService, ServiceConfig
    from deltavision.mist.wire import unpack

    torch.manual_seed(0)
    model = create_backbone(backbone, 0, pretrained=pretrained).eval()
    service = FeatureService(
        model, backbone=backbone, image_size=image_size, mean=(0.5,) * 3, std=(0.5,) * 3, config=ServiceConfig(token=TOKEN)
    )
    setting = f"{backbone} @ {image_size}px" + ("" if pretrained else " (random init)")
    images = photos(8, 224, seed=1)
    files = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    client = TestClient(create_app(service))
    info = service.info()
    rows = [_row("transfer", setting, "feature shape (tokens x C)", f"{info['feature_shape'][0]} x {info['feature_shape'][1]}", "")]
    rows.append(_row("transfer", setting, "k candidates", str(info["ks"]), ""))
    rows.append(_row("transfer", setting, "input JPEG (mean of 8 crops)", sum(map(len, images)) / 8, "bytes"))
    for dtype in ("float32", "float16", "int8"):
        response = client.post("/v1/features", params={"dtype": dtype}, files=files, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200, response.text
        unpack(response.content)
        rows.append(_row("transfer", setting, f"MIST Gather_k, {dtype}", len(response.content) / 8, "bytes"))
    every_k = client.post("/v1/features", params={"k": "all", "dtype": "float16"}, files=files, headers={"Authorization": f"Bearer {TOKEN}"})
    rows.append(_row("transfer", setting, "all candidate k at once (k auto), float16", len(every_k.content) / 8, "bytes"))
    pixels = service.decode(images[0])[None]
    rows.append(_row("transfer", setting, "side tuning: every block output, float32", side_tuning_bytes(model, pixels), "bytes"))
    service.close()
    return rows


# --- 2. edge memory ------------------------------------------------------------------------------


def fill_vit_b_store(root: Path, count: int) -> tuple[str, list[str]]:
    from deltavision.mist.edge.store import FeatureStore

    store = FeatureStore(root, "vit-b-shaped")
    names = [f"image{i:05d}" for i in range(count)]
    generator = torch.Generator().manual_seed(0)
    for start in range(0, count, 64):
        chunk = names[start : start + 64]
        features = (torch.randn(len(chunk), 197, 768, generator=generator) * 2).half()
        store.write_shard(12, "float16", chunk, features, None)
    return store.fingerprint, names


def memory_worker(mode: str, allocator: str, root: str, model_dir: str, count: int, package_dir: str) -> dict:
    torch.set_num_threads(1)
    edge_only_imports(package_dir)
    from deltavision.memory import release_large_blocks

    if allocator == "low-memory":
        assert release_large_blocks()
    from deltavision.mist.edge.network import EdgeConfig, EdgeNetwork, load_edge
    from deltavision.mist.edge.fit import FeatureSet, FitConfig, evaluate_edge, train_edge
    from deltavision.mist.edge.store import FeatureStore

    store = FeatureStore(Path(root), "vit-b-shaped")
    names = [f"image{i:05d}" for i in range(count)]
    labels = torch.arange(count) % 10
    data = FeatureSet(store, 12, "float16", names, labels)
    store.index(12, "float16")
    reset_peak_rss()
    baseline, _ = rss_mb()
    started = time.perf_counter()
    if mode == "train":
        torch.manual_seed(0)
        model = EdgeNetwork(EdgeConfig(tokens=197, width=768, classes=[str(c) for c in range(10)], k=12))
        train_edge(model, data, FitConfig(epochs=TRAIN_EPOCHS, batch_size=32, progress=False))
    else:
        evaluate_edge(load_edge(Path(model_dir)), data, batch_size=32)
    seconds = time.perf_counter() - started
    _, peak = rss_mb()
    timm_loaded = any(name == "timm" or name.startswith("timm.") for name in sys.modules)
    return {"baseline_mb": baseline, "peak_mb": peak, "seconds": seconds, "images": count, "timm_loaded": timm_loaded}


def memory_rows(work: Path, count: int) -> list[dict]:
    import deltavision
    from deltavision.mist.edge.network import EdgeConfig, EdgeNetwork, count_trainable, save_edge

    root = work / "vit-b-features"
    fill_vit_b_store(root, count)
    model = EdgeNetwork(EdgeConfig(tokens=197, width=768, classes=[str(c) for c in range(10)], k=12))
    save_edge(model, work / "edge-vit-b")
    rows = [_row("edge memory", "ViT-B/16 features 197x768 (float16 store)", "LAE trainable parameters", count_trainable(model), "")]
    package_dir = str(Path(deltavision.__file__).parent)
    for mode in ("train", "predict"):
        for allocator, described in ALLOCATORS.items():
            result = run_worker("memory", mode, allocator, str(root), str(work / "edge-vit-b"), str(count), package_dir, threads=1)
            assert not result["timm_loaded"]
            growth = result["peak_mb"] - result["baseline_mb"]
            what = f"fine-tune, batch 32, {TRAIN_EPOCHS} epochs of {count}" if mode == "train" else f"predict, batch 32, {count} images"
            label = f"{what}, {described}"
            rows.append(_row("edge memory", "ViT-B/16 features 197x768 (float16 store)", f"{label}: peak RSS growth", growth, "MB",
                             f"< {MEMORY_TARGETS_MB[mode]} MB", growth < MEMORY_TARGETS_MB[mode]))  # fmt: skip
            rows.append(_row("edge memory", "ViT-B/16 features 197x768 (float16 store)", f"{label}: seconds", result["seconds"], "s"))
    rows.append(_row("edge memory", "ViT-B/16 features 197x768 (float16 store)", "post-import RSS of an edge process (timm refused)", result["baseline_mb"], "MB"))
    return rows


# --- 3. service throughput -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServiceProcess:
    """``python -m deltavision.mist serve`` on a free loopback port, stopped on exit."""

    def __init__(self, *arguments: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DELTAVISION_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "deltavision.mist", "serve", "--port", str(self.port), *arguments,
                   "--device", DEVICE_ARGS[0], "--precision", DEVICE_ARGS[1]]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    def __enter__(self) -> "ServiceProcess":
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("service did not start within 180 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def baseline_worker(backbone: str, image_size: int, batch: int, images: int, pretrained: bool,
                    device: str = "cpu", precision: str = "fp32") -> dict:
    """Images/s of the Gather pass on ready tensors, timed in the main thread and in a second
    thread (where the service runs it; on a contended CPU the two can differ), interleaved.
    On ``device`` in ``precision``, as ``serve --device --precision`` runs it (the features come
    back to the CPU, so every pass ends synchronized)."""
    from deltavision.backbones import create_backbone
    from deltavision.mist.server.gather import Gather

    torch.manual_seed(0)
    gather = Gather(create_backbone(backbone, 0, pretrained=pretrained), device=device, precision=precision)
    pixels = torch.randn(batch, 3, image_size, image_size).to(gather.device)
    speeds: dict[str, list[float]] = {"main thread": [], "worker thread": []}

    def timed(where: str) -> None:
        gather(pixels)  # warm-up at the timed batch shape
        started, done = time.perf_counter(), 0
        while done < images:
            gather(pixels[: min(batch, images - done)])
            done += min(batch, images - done)
        speeds[where].append(images / (time.perf_counter() - started))

    for _ in range(2):
        timed("main thread")
        worker = threading.Thread(target=timed, args=("worker thread",))
        worker.start()
        worker.join()
    return {where: statistics.mean(values) for where, values in speeds.items()}


def load_clients(url: str, payloads: list[list[bytes]], clients: int, time_limit: float) -> dict:
    """Send every payload once from ``clients`` threads; bounded by count and by ``time_limit``."""
    import httpx

    jobs = list(enumerate(payloads))
    lock, latencies, failures = threading.Lock(), [], []
    deadline = time.monotonic() + time_limit

    def work() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=time_limit) as http:
            while time.monotonic() < deadline:
                with lock:
                    if not jobs:
                        return
                    _, images = jobs.pop()
                files = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
                sent = time.perf_counter()
                try:
                    status = http.post("/v1/features", params={"dtype": "float16"}, files=files).status_code
                except httpx.HTTPError as err:
                    status = type(err).__name__
                with lock:
                    (latencies if status == 200 else failures).append(time.perf_counter() - sent if status == 200 else status)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=time_limit + 30)
    elapsed = time.perf_counter() - started
    served = len(latencies) * len(payloads[0])
    ordered = sorted(latencies)
    return {
        "images_per_s": served / elapsed,
        "requests": len(latencies),
        "failed": len(failures) + len(jobs),
        "p50_s": statistics.median(ordered) if ordered else float("nan"),
        "p99_s": ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))] if ordered else float("nan"),
    }


def throughput_rows(backbone: str, image_size: int, pretrained: bool, images: int, clients: int, per_request: int, batch: int) -> list[dict]:
    setting = f"{backbone} @ {image_size}px, {clients} clients x {per_request} images/request, max batch {batch}"
    flag = "--pretrained" if pretrained else "--no-pretrained"
    worker_args = ("baseline", backbone, str(image_size), str(batch), str(images // 2), str(pretrained), *DEVICE_ARGS)
    before = run_worker(*worker_args)
    payloads = [photos(per_request, 224, seed=1000 + r) for r in range(images // per_request)]
    warm_up = [photos(per_request, 224, seed=500 + r) for r in range(batch // per_request)]
    with ServiceProcess("--backbone", backbone, flag, "--image-size", str(image_size), "--max-batch", str(batch), "--max-wait-ms", "10") as service:
        load_clients(service.url, warm_up, clients, time_limit=300)  # one full batch, as the reference warms up
        load = load_clients(service.url, payloads, clients, time_limit=600)
    after = run_worker(*worker_args)
    reference = {where: (before[where] + after[where]) / 2 for where in before}
    plain = max(reference.values())
    ratio = load["images_per_s"] / plain
    shown = "; ".join(f"{where} {before[where]:.2f} / {after[where]:.2f}" for where in before)
    return [
        _row("throughput", setting, f"in-process Gather pass, before / after ({shown})", plain, "images/s (best mean)"),
        _row("throughput", setting, "service, concurrent clients", load["images_per_s"], "images/s"),
        _row("throughput", setting, "service / in-process", ratio, "ratio", f">= {THROUGHPUT_TARGET}", ratio >= THROUGHPUT_TARGET),
        _row("throughput", setting, "requests ok / failed", f"{load['requests']} / {load['failed']}", ""),
        _row("throughput", setting, "request latency p50", load["p50_s"], "s"),
        _row("throughput", setting, "request latency p99", load["p99_s"], "s"),
    ]


# --- 4. accuracy ---------------------------------------------------------------------------------


def accuracy_rows(work: Path, epochs: int, train_limit: int, val_limit: int, image_size: int) -> list[dict]:
    from deltavision.mist.edge.fit import FitConfig
    from deltavision.mist.edge.commands import FitOptions, fit_edge

    torch.set_num_threads(1)  # the edge default; also used for linear probing (2 contended threads were slower)
    setting = f"{EMBEDDED} (ImageNet) on Fashion-MNIST, {image_size}px, {train_limit}/{val_limit}, {epochs} epochs"
    fit = FitConfig(epochs=epochs, select_epochs=max(1, epochs // 3), warmup_epochs=0.5, progress=False)
    common = dict(data="fashion-mnist", train_limit=train_limit, val_limit=val_limit, token=TOKEN, fit=fit)
    cache = work / "fashion-cache"
    rows = []

    def run(name: str, **changes) -> dict:
        started = time.perf_counter()
        summary = fit_edge(FitOptions(out=work / name, cache=cache, **{**common, **changes}))
        summary["seconds"] = time.perf_counter() - started
        log(f"  {name}: k={summary['k']} top-1 {summary['top1']:.2f}%")
        return summary

    with ServiceProcess("--backbone", EMBEDDED, "--image-size", str(image_size)) as service:
        auto = run("auto-float32", server=service.url, k="auto", dtype="float32")
        best = auto["k"]
        scores = ", ".join(f"k={k}: {v:.1f}" for k, v in auto["k_scores"].items())
        rows.append(_row("accuracy", setting, f"MIST, k auto (picked k={best}; val top-1 after {fit.select_epochs} epochs: {scores})", auto["top1"], "% top-1"))
        for dtype in ("float16", "int8"):
            summary = run(f"k{best}-{dtype}", server=service.url, k=str(best), dtype=dtype)
            rows.append(_row("accuracy", setting, f"MIST k={best}, {dtype} transfer", summary["top1"], "% top-1"))
    for k in [int(k) for k in auto["k_scores"]]:
        summary = run(f"k{k}-float32", offline=True, k=str(k), dtype="float32")
        rows.append(_row("accuracy", setting, f"MIST k={k}, float32 ({summary['seconds']:.0f} s edge training)", summary["top1"], "% top-1"))
    no_lae = run(f"k{best}-no-lae", offline=True, k=str(best), dtype="float32", num_blocks=0)
    rows.append(_row("accuracy", setting, f"Gather_k={best} + norm + linear head (no LAE blocks)", no_lae["top1"], "% top-1"))
    rows.append(_row("accuracy", setting, "MIST edge trainable parameters", auto["trainable_parameters"], ""))
    rows += linear_probe_rows(work, setting, epochs, train_limit, val_limit, image_size)
    rows += logistic_probe_rows(setting, train_limit, val_limit, image_size)
    return rows


def linear_probe_rows(work: Path, setting: str, epochs: int, train_limit: int, val_limit: int, image_size: int) -> list[dict]:
    """The library's "linear" method through run_training, at its default lr and at the edge's."""
    from deltavision.methods import get_method
    from deltavision.mist.edge.fit import FitConfig
    from deltavision.train import RunConfig, TrainConfig, run_training

    rows = []
    for lr in sorted({get_method("linear").default_lr, FitConfig.lr}):
        config = RunConfig(
            backbone=EMBEDDED, method="linear", data="fashion-mnist", out_dir=str(work / f"linear-{lr:g}"),
            image_size=image_size, train_limit=train_limit, val_limit=val_limit, augment=False,
            train=TrainConfig(epochs=epochs, batch_size=32, lr=lr, warmup_epochs=0.5, seed=0, progress=False),
        )  # fmt: skip
        summary = run_training(config)
        log(f"  linear probe lr {lr:g}: top-1 {summary['top1']:.2f}%")
        rows.append(_row("accuracy", setting, f"linear probing, lr {lr:g} (head on pooled final features; "
                         f"{summary['train_seconds']:.0f} s training through the backbone)", summary["top1"], "% top-1"))  # fmt: skip
    rows.append(_row("accuracy", setting, "linear probing trainable parameters", summary["trainable"], ""))
    return rows


def logistic_probe_rows(setting: str, train_limit: int, val_limit: int, image_size: int) -> list[dict]:
    """A stronger linear probe: L-BFGS logistic regression on standardised pooled final features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from torch.utils.data import DataLoader

    from deltavision.backbones import create_backbone
    from deltavision.data import build_datasets

    splits = build_datasets("fashion-mnist", image_size=image_size, mean=0.5, std=0.5, train_limit=train_limit,
                            val_limit=val_limit, augment=False, seed=0)  # fmt: skip
    model = create_backbone(EMBEDDED, 0, pretrained=True).eval()

    def pooled(dataset):
        with torch.inference_mode():
            batches = [(model(x), y) for x, y in DataLoader(dataset, batch_size=100)]
        return torch.cat([f for f, _ in batches]).numpy(), torch.cat([y for _, y in batches]).numpy()

    (train_x, train_y), (val_x, val_y) = pooled(splits.train), pooled(splits.val)
    scaler = StandardScaler().fit(train_x)
    scores = {}
    for strength in (0.01, 0.1, 1.0):
        fitted = LogisticRegression(C=strength, max_iter=2000).fit(scaler.transform(train_x), train_y)
        scores[strength] = 100.0 * float((fitted.predict(scaler.transform(val_x)) == val_y).mean())
    best = max(scores, key=scores.get)
    log(f"  logistic probe: {scores}")
    shown = ", ".join(f"C={c:g}: {v:.1f}" for c, v in scores.items())
    return [_row("accuracy", setting, f"logistic regression on standardised pooled final features (L-BFGS; {shown}; best shown)",
                 scores[best], "% top-1")]  # fmt: skip


# --- results -------------------------------------------------------------------------------------


def _row(section: str, setting: str, metric: str, value, unit: str, target: str = "", meets: bool | None = None) -> dict:
    return {"section": section, "setting": setting, "metric": metric, "value": value, "unit": unit,
            "target": target, "meets": "" if meets is None else ("yes" if meets else "NO")}  # fmt: skip


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_csv(rows: list[dict], path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


NOTES = [
    "Accuracy: train and val are the same 2000 / 1000 Fashion-MNIST images for every row (seed 0; val from the "
    "official test split). The edge default learning rate (3e-3) was picked from {1e-3, 3e-3, 1e-2} on this val "
    "split during development, k auto selects on it, and the logistic-regression C is the best of three on it: "
    "all rows are tuned on val to a similar small degree, none on a separate test split.",
    "Linear probing rows use deltavision's `linear` method (AdamW on the classifier over the backbone's pooled "
    "final features, same epochs, batch, schedule and label smoothing as the edge network); the logistic "
    "regression row probes the same features with standardisation and a full-batch solver.",
    "Edge memory: growth of VmHWM over VmRSS after imports (Linux /proc), in a fresh process where importing timm "
    "fails; ru_maxrss is not used because a child started by subprocess inherits its parent's ru_maxrss.",
    "Throughput reference: the same Gather pass on ready tensors at the service's batch size, in a fresh process "
    "before and after the service run, timed in the main thread and in a worker thread (the service runs the "
    "backbone in one); the faster mean is the reference.",
]


def markdown(rows: list[dict], header: str) -> str:
    lines = ["# MIST (separated tuning) measurements", "", header, ""] + [f"- {note}" for note in NOTES] + [""]
    for section in dict.fromkeys(r["section"] for r in rows):
        lines += [f"## {section}", ""]
        for setting in dict.fromkeys(r["setting"] for r in rows if r["section"] == section):
            lines += [f"**{setting}**", "", "| metric | value | unit | target | meets |", "|---|---:|---|---|---|"]
            for r in rows:
                if r["section"] == section and r["setting"] == setting:
                    lines.append(f"| {r['metric']} | {_shown(r['value'])} | {r['unit']} | {r['target']} | {r['meets']} |")
            lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transfer = [r for r in rows if r["section"] == "transfer" and r["unit"] == "bytes"]
    accuracy = [r for r in rows if r["section"] == "accuracy" and r["unit"] == "% top-1"]
    figure, axes = plt.subplots(1, 2, figsize=(15, 6))
    labels = [f"{r['setting'].split(' (')[0]}\n{r['metric']}" for r in transfer]
    axes[0].barh(range(len(transfer)), [r["value"] / 1024 for r in transfer], color="tab:blue")
    axes[0].set_yticks(range(len(transfer)), labels, fontsize=6)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("KiB per image (log)")
    axes[0].set_title("Transfer per image")
    axes[0].invert_yaxis()
    names = [r["metric"].split(" (")[0] for r in accuracy]
    colors = ["tab:orange" if n.startswith(("linear probing", "logistic")) else "tab:green" for n in names]
    axes[1].barh(range(len(accuracy)), [r["value"] for r in accuracy], color=colors)
    axes[1].set_yticks(range(len(accuracy)), names, fontsize=7)
    low = min((r["value"] for r in accuracy), default=0)
    axes[1].set_xlim(max(0, low - 5), 100)
    axes[1].set_xlabel("val top-1 %")
    axes[1].set_title("EfficientNet-Lite0 on Fashion-MNIST")
    axes[1].invert_yaxis()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (numbers not meaningful)")
    parser.add_argument("--device", default="cpu", help="where the feature service and its in-process "
                        "reference run: cpu (default), cuda or cuda:N; the edge sections stay on the CPU")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="precision of the served backbone (default fp32; fp16 needs a GPU)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    DEVICE_ARGS[:] = [args.device, args.precision]
    if args.worker:
        kind, *rest = args.worker
        if kind == "memory":
            result = memory_worker(rest[0], rest[1], rest[2], rest[3], int(rest[4]), rest[5])
        else:
            result = baseline_worker(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), rest[4] == "True", *rest[5:7])
        print(RESULT_TAG + json.dumps(result), flush=True)
        return

    started = time.time()
    quick = args.quick
    rows: list[dict] = []
    sections = [
        ("transfer bytes", lambda work: transfer_rows(VIT_B, 224, pretrained=False)
            + transfer_rows(EMBEDDED, 224, pretrained=True) + transfer_rows(EMBEDDED, 64, pretrained=True)),
        ("edge memory", lambda work: memory_rows(work, count=64 if quick else 256)),
        ("service throughput", lambda work: throughput_rows(VIT_B, 224, False, images=16 if quick else 64, clients=4, per_request=4, batch=16)
            + throughput_rows(EMBEDDED, 224, True, images=32 if quick else 256, clients=4, per_request=8, batch=32)),
        ("accuracy", lambda work: accuracy_rows(work, epochs=2 if quick else 10, train_limit=200 if quick else 2000,
                                                val_limit=100 if quick else 1000, image_size=64)),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mist-bench-") as scratch:
        for name, measure in sections:
            log(name)
            rows += measure(Path(scratch))
            write_results(rows, args.out, started, quick)  # whatever is done survives an interruption
    print(markdown(rows, results_header(started, quick)))


def results_header(started: float, quick: bool) -> str:
    load = os.getloadavg()
    return (
        f"Timings were taken on a shared 2-core CPU (other work was running; load average when written "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}), so absolute seconds and images/s are noisy; "
        f"compare ratios. {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, wall time {(time.time() - started) / 60:.1f} min"
        + (" (--quick: numbers are not meaningful)." if quick else ".")
    )


def write_results(rows: list[dict], out: Path, started: float, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, results_header(started, quick))
    atomic_write(out / "mist.md", lambda tmp: Path(tmp).write_text(text + "\n"))
    write_csv(rows, out / "mist.csv")
    plot(rows, out / "mist.png")


if __name__ == "__main__":
    main()
