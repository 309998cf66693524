"""MIST against a real feature service: `python -m deltavision.mist serve` on a free loopback port.

End-to-end edge training on real digits through the CLI, resuming an interrupted
feature download without refetching, and a bounded concurrent load.
"""

import csv
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import timm
import torch
import typer
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from deltavision.data import write_image_folder
from deltavision.mist.cli import edge_app, serve_command
from deltavision.mist.edge.client import FeatureClient, ServiceError, download_features, labelled_images
from deltavision.mist.edge.network import read_edge_config
from deltavision.mist.edge.store import FeatureStore
from deltavision.mist.wire import unpack

TOKEN = "live-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VIT_OPTIONS = ["img_size=32", "patch_size=8", "embed_dim=32", "depth=4", "num_heads=2"]
STARTUP_SECONDS = 90


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """URL of a service process serving a tiny seeded ViT from a local checkpoint; stopped after the module."""
    port = free_port()
    folder = tmp_path_factory.mktemp("server")
    log, checkpoint = folder / "server.log", folder / "tiny-vit.safetensors"
    torch.manual_seed(0)
    options = {key: int(value) for key, value in (option.split("=") for option in VIT_OPTIONS)}
    weights = timm.create_model("vit_small_patch16_224", pretrained=False, **options).state_dict()
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(checkpoint))
    command = [sys.executable, "-m", "deltavision.mist", "serve", "--backbone", "vit_small_patch16_224",
               "--checkpoint", str(checkpoint), "--port", str(port), "--max-wait-ms", "20", "--max-images", "16"]  # fmt: skip
    for option in VIT_OPTIONS:
        command += ["--backbone-opt", option]
    env = {**os.environ, "DELTAVISION_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _wait_until_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the service exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    pytest.fail(f"the service did not come up within {STARTUP_SECONDS}s:\n{log.read_text()[-3000:]}")


def json_lines(output: str) -> list[dict]:
    """The JSON objects a command printed (CliRunner mixes progress bars into the same output)."""
    return [json.loads(line[line.index("{"):]) for line in output.splitlines() if line.rstrip().endswith("}")]


def stats(url: str) -> dict:
    return httpx.get(f"{url}/v1/stats", headers=AUTH, timeout=10).json()


@pytest.fixture(scope="module")
def cli():
    """The commands mounted as src/deltavision/cli/ mounts them."""
    app = typer.Typer()
    app.command("serve")(serve_command)
    app.add_typer(edge_app, name="edge")
    runner = CliRunner()

    def invoke(*args):
        arguments = [str(a) for a in args]
        if arguments[:2] in (["edge", "fit"], ["edge", "eval"], ["edge", "predict"]):
            arguments.append("--no-low-memory")  # keep this pytest process's allocator as it was
        return runner.invoke(app, arguments)

    return invoke


@pytest.fixture(scope="module")
def digits300(tmp_path_factory) -> Path:
    """300 real sklearn digits (30 per class) as a train/ + val/ PNG folder."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.concatenate([np.flatnonzero(digits.target == c)[:30] for c in range(10)])
    root = tmp_path_factory.mktemp("live") / "digits300"
    return write_image_folder(root, digits.images[keep], digits.target[keep], [str(c) for c in range(10)], val_fraction=0.25)


def noise_folder(root: Path, per_class: int, seed: int) -> Path:
    """Two classes of distinct random images (no two share bytes)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (2 * per_class, 12, 12, 3), dtype=np.uint8)
    return write_image_folder(root, images, [0, 1] * per_class, ["left", "right"], split=False)


def test_cli_fit_eval_predict_and_offline_on_real_digits(server, cli, digits300, tmp_path):
    out = tmp_path / "edge"
    before = stats(server)["images_received"]
    result = cli("edge", "fit", "--server", server, "--token", TOKEN, "--data", digits300, "--out", out,
                 "--k", "auto", "--epochs", "20", "--select-epochs", "3", "--lr", "1e-2")  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "k selection" in result.output
    assert stats(server)["images_received"] - before == 300  # each image sent exactly once for all four k

    config = read_edge_config(out)
    assert config.backbone == "vit_small_patch16_224" and config.k in (1, 2, 3, 4) and config.dtype == "float16"
    assert (config.tokens, config.width) == (17, 32) and config.classes == [str(c) for c in range(10)]
    top1 = config.training["top1"]
    assert top1 > 25.0, f"edge network near chance level (10%): {top1}%"
    assert (out / "edge_model.safetensors").is_file()

    evaluated = cli("edge", "eval", out, "--server", server, "--token", TOKEN, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json_lines(evaluated.output)
    assert metrics[-1]["top1"] == pytest.approx(top1) and metrics[-1]["images"] == 75

    images = sorted((digits300 / "val" / "7").glob("*.png"))[:2] + sorted((digits300 / "val" / "0").glob("*.png"))[:1]
    predicted = cli("edge", "predict", out, *images, "--server", server, "--token", TOKEN, "--json")
    assert predicted.exit_code == 0, predicted.output
    labels = json_lines(predicted.output)
    assert len(labels) == 3 and all(row["label"] in config.classes for row in labels)
    assert [Path(row["image"]).name for row in labels] == [image.name for image in images]

    received = stats(server)["images_received"]
    offline = cli("edge", "fit", "--offline", "--cache", out / "feature-cache", "--out", tmp_path / "offline",
                  "--k", str(config.k), "--epochs", "2")  # fmt: skip
    assert offline.exit_code == 0, offline.output + repr(offline.exception)
    again = cli("edge", "fit", "--server", server, "--token", TOKEN, "--data", digits300, "--out", out,
                "--overwrite", "--epochs", "1", "--select-epochs", "1")  # fmt: skip
    assert again.exit_code == 0, again.output
    assert stats(server)["images_received"] == received  # everything came from the local cache


def test_cli_errors_are_deltavision_errors(server, cli, digits300, tmp_path):
    wrong = cli("edge", "fit", "--server", server, "--token", "wrong", "--data", digits300, "--out", tmp_path / "x")
    assert isinstance(wrong.exception, ServiceError) and "token" in str(wrong.exception)
    closed = cli("edge", "fit", "--server", f"http://127.0.0.1:{free_port()}", "--token", TOKEN,
                 "--data", digits300, "--out", tmp_path / "y", "--retry-seconds", "1")  # fmt: skip
    assert isinstance(closed.exception, ServiceError) and "cannot reach" in str(closed.exception)
    bad_k = cli("edge", "fit", "--server", server, "--token", TOKEN, "--data", digits300, "--out", tmp_path / "z", "--k", "7")
    assert bad_k.exception is not None and "--k" in str(bad_k.exception)


class Interrupted(Exception):
    pass


class RecordingClient(FeatureClient):
    """Records the digests it sends; with ``die_after`` it dies after that many answered requests,
    the last one answered but never stored (the batch in flight is lost)."""

    def __init__(self, *args, die_after: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.die_after, self.sent = die_after, []

    def features(self, images, ks, dtype):
        payload = super().features(images, ks, dtype)
        self.sent.extend(payload.digests)
        if self.die_after is not None and len(self.sent) > self.die_after * 8:
            raise Interrupted
        return payload


def test_interrupted_download_resumes_without_refetching(server, tmp_path):
    data = noise_folder(tmp_path / "noise", per_class=20, seed=1)
    images = labelled_images(data, val_fraction=0.25)
    items = images.train + images.val
    assert len({item.digest for item in items}) == 40
    with RecordingClient(server, TOKEN, die_after=2) as dying:
        store = FeatureStore(tmp_path / "cache", dying.info()["fingerprint"])
        before = stats(server)["images_received"]
        with pytest.raises(Interrupted):
            download_features(dying, store, items, [2, 4], "int8", batch_size=8, progress=False)
    stored = {item.digest for item in items} - set(store.missing([i.digest for i in items], [2, 4], "int8"))
    assert len(stored) == 16 and set(dying.sent[:16]) == stored  # two whole batches survived
    assert not list((tmp_path / "cache").rglob("*.tmp"))

    with RecordingClient(server, TOKEN) as resumed:
        sent_now = download_features(resumed, FeatureStore(tmp_path / "cache", store.fingerprint), items, [2, 4],
                                     "int8", batch_size=8, progress=False)  # fmt: skip
    assert sent_now == 24 and len(resumed.sent) == 24 and not stored & set(resumed.sent)
    assert stats(server)["images_received"] - before == 24 + 24  # 16 kept + 8 lost in flight, then the 24 missing
    complete = FeatureStore(tmp_path / "cache", store.fingerprint)
    assert complete.missing([i.digest for i in items], [2, 4], "int8") == []
    assert complete.read(4, "int8", [items[0].digest]).shape == (1, 17, 32)


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bounded_concurrent_load_has_no_failures(server):
    """4 threads x 10 requests x 2 images (one unique, one shared by all), under a time bound."""
    threads, requests_each, deadline = 4, 10, time.monotonic() + 120
    shared = png_bytes(10_000)
    outcomes, lock = [], threading.Lock()
    computed_before = stats(server)["batching"]["images_computed"]

    def load(worker: int) -> None:
        with httpx.Client(base_url=server, headers=AUTH, timeout=30) as http:
            for index in range(requests_each):
                if time.monotonic() > deadline:
                    break
                unique = png_bytes(1000 * worker + index + 20_000)
                files = [("images", ("u.png", unique, "image/png")), ("images", ("s.png", shared, "image/png"))]
                try:
                    response = http.post("/v1/features", params={"k": "2", "dtype": "float16"}, files=files)
                    result = (response.status_code, response.content)
                except httpx.HTTPError as err:
                    result = (type(err).__name__, b"")
                with lock:
                    outcomes.append(result)

    workers = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not any(worker.is_alive() for worker in workers)
    statuses = [status for status, _ in outcomes]
    assert statuses == [200] * threads * requests_each
    shared_rows = [unpack(content).features[2][1] for _, content in outcomes]
    assert all(torch.equal(row, shared_rows[0]) for row in shared_rows)
    after = stats(server)["batching"]
    assert after["images_computed"] - computed_before == threads * requests_each + 1


# --- segmentation on the edge (MIST appendix Sec. 8), against the live service ----------------------

SEGMENTATION_EDGE_SCRIPT = """
import importlib.abc, json, os, sys

opened = []


def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        opened.append(os.path.abspath(os.fsdecode(args[0])))


class RefuseTimm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("timm", "segmentation_models_pytorch"):
            raise ImportError("an edge device has no timm")
        return None


sys.addaudithook(audit)
sys.meta_path.insert(0, RefuseTimm())
from deltavision.mist.cli import app

for arguments in json.loads(sys.argv[1]):
    app(arguments, standalone_mode=False)
weights = [path for path in opened if path.endswith((".safetensors", ".pth", ".pt", ".bin", ".npz"))]
print(json.dumps({"weights_opened": sorted(set(weights)),
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("timm", "segmentation_models_pytorch")
                                    or m in ("deltavision.backbones", "deltavision.embedded", "deltavision.model.build",
                                             "deltavision.anatomy") or m.startswith("deltavision.mist.server"))}))
"""


def squares_folder(root: Path, count: int = 16) -> Path:
    """images/ + masks/ + classes.txt: dark noise with one red (1) or blue (2) square; one image is 40 x 24."""
    rng = np.random.default_rng(5)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nred\nblue\n")
    for index in range(count):
        height, width = (24, 40) if index == 0 else (32, 32)
        pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width), dtype=np.uint8)
        label, top, left = 1 + index % 2, rng.integers(0, height - 12), rng.integers(0, width - 12)
        pixels[top : top + 12, left : left + 12] = (220, 30, 30) if label == 1 else (30, 30, 220)
        mask[top : top + 12, left : left + 12] = label
        Image.fromarray(pixels).save(root / "images" / f"scene{index:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"scene{index:02d}.png")
    return root


def test_segmentation_edge_end_to_end_without_timm_or_backbone_weights(server, tmp_path):
    """fit (k chosen by mIoU), eval and predict through the CLI in a process where timm cannot be imported."""
    data, out, masks = squares_folder(tmp_path / "squares"), tmp_path / "edge", tmp_path / "masks"
    common = ["--server", server, "--token", TOKEN, "--no-low-memory"]
    commands = [
        ["edge", "fit", "--task", "segmentation", "--data", str(data), "--out", str(out), "--val-fraction", "0.25",
         "--k", "auto", "--select-epochs", "1", "--epochs", "3", "--batch-size", "4", "--lr", "1e-2",
         "--decoder-width", "16", *common],
        ["edge", "eval", str(out), "--json", *common],
        ["edge", "eval", str(out), *common],
        ["edge", "predict", str(out), str(data / "images" / "scene00.png"), str(data / "images" / "scene01.png"),
         "--out", str(masks), "--json", *common],
    ]  # fmt: skip
    before = stats(server)["images_received"]
    result = subprocess.run(
        [sys.executable, "-c", SEGMENTATION_EDGE_SCRIPT, json.dumps(commands)], capture_output=True, text=True,
        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "DELTAVISION_TOKEN": TOKEN},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["modules"] == []
    assert all(Path(path).is_relative_to(tmp_path) for path in report["weights_opened"]), report["weights_opened"]
    assert stats(server)["images_received"] - before == 16 + 2  # the folder once (all four k), then the predicted files

    config = read_edge_config(out)
    assert config.task == "segmentation" and config.grid == [4, 4] and config.num_prefix_tokens == 1
    assert config.image_size == 32 and set(config.training["k_scores"]) == {"1", "2", "3", "4"}
    rows = list(csv.DictReader((out / "log.csv").read_text().splitlines()))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert {"miou", "pixel_acc", "iou/background", "iou/red", "iou/blue"} <= set(rows[0])
    assert float(rows[-1]["miou"]) == pytest.approx(config.training["miou"])

    lines = result.stdout.splitlines()
    evaluated = json.loads(next(line for line in lines if line.startswith('{"val_loss"')))
    assert evaluated["images"] == 4 and evaluated["miou"] == pytest.approx(config.training["miou"], abs=1e-6)
    assert any(line.startswith("mIoU ") and "on 4 images" in line for line in lines)
    assert any("IoU %" in line for line in lines) and any("blue" in line for line in lines)

    predicted = [json.loads(line) for line in lines if line.startswith('{"image"')]
    assert [Path(row["mask"]).name for row in predicted] == ["scene00.png", "scene01.png"]
    with Image.open(masks / "scene00.png") as mask:
        assert mask.mode == "P" and mask.size == (40, 24)  # the image's own size, not the service's 32 x 32
        assert set(np.unique(np.asarray(mask))) <= {0, 1, 2}
