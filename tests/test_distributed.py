"""Data-parallel training with two CPU processes (gloo), launched by torchrun as users launch it.

A tiny ViT without BatchNorm, LoRA, fixed data (no augmentation): two processes with batch 4 take
the same optimizer steps as one process with the global batch of 8.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import TINY

VIT, VIT_OPTS = TINY["vit"]
TIMEOUT = 300


def _train_args(data, out, checkpoint, batch_size, epochs=2):
    opts = [f"--backbone-opt={k}={v}" for k, v in VIT_OPTS.items()]
    return ["train", "--data", str(data), "--out", str(out), "--backbone", VIT, *opts, "--method", "lora",
            "--checkpoint", str(checkpoint), "--image-size", "32", "--no-augment", "--train-limit", "48",
            "--batch-size", str(batch_size), "--epochs", str(epochs), "--seed", "5", "--device", "cpu"]


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "deltavision", *map(str, args)]


def _single(*args):
    return [sys.executable, "-m", "deltavision", *map(str, args)]


def _run(command, cwd):
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_folder, backbone_checkpoint):
    root = tmp_path_factory.mktemp("ddp")
    checkpoint = backbone_checkpoint("vit")
    _run(_torchrun(*_train_args(digits_folder, root / "ddp", checkpoint, batch_size=4)), root)
    _run(_single(*_train_args(digits_folder, root / "single", checkpoint, batch_size=8)), root)
    return root, checkpoint


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(runs):
    root, _ = runs
    ddp = load_file(str(root / "ddp" / "adapter" / "deltavision.safetensors"))
    single = load_file(str(root / "single" / "adapter" / "deltavision.safetensors"))
    assert ddp.keys() == single.keys() and any("lora_b" in k for k in ddp)
    worst = max((ddp[k] - single[k]).abs().max().item() for k in ddp)
    assert worst < 1e-5, worst
    assert any(ddp[k].abs().max() > 0 for k in ddp if "lora_b" in k)  # it trained


@pytest.mark.slow
def test_validation_counts_every_image_once_and_metrics_agree(runs):
    root, _ = runs
    ddp_log = list(csv.DictReader((root / "ddp" / "log.csv").open(newline="")))
    single_log = list(csv.DictReader((root / "single" / "log.csv").open(newline="")))
    assert list(ddp_log[0]) == list(single_log[0]) and len(ddp_log) == len(single_log) == 2
    measured = {"process_peak_memory_mb", "images_per_s"}  # of the machine, not of the training
    for ddp_row, single_row in zip(ddp_log, single_log):
        for key in set(ddp_row) - measured:
            assert float(ddp_row[key]) == pytest.approx(float(single_row[key]), rel=1e-4, abs=1e-6), key
        assert all(float(ddp_row[key]) > 0 for key in measured)


@pytest.mark.slow
def test_only_rank_zero_writes_and_run_json_records_the_world(runs):
    root, _ = runs
    names = sorted(p.name for p in (root / "ddp").iterdir())
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    assert len(events) == 1  # TensorBoard: the main process only
    assert [n for n in names if n not in events] == [
        "adapter", "checkpoint.safetensors", "curves.png", "log.csv", "run.json"
    ]
    leftovers = [p.name for p in (root / "ddp").rglob("*") if p.name.startswith(".")]
    assert leftovers == []
    how = json.loads((root / "ddp" / "run.json").read_text())["run"]
    assert how == {"device": "cpu", "precision": "fp32", "world_size": 2, "batch_per_device": 4, "grad_accum": 1,
                   "global_batch": 8}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_from_its_last_epoch(runs, digits_folder, tmp_path):
    root, checkpoint = runs
    out = tmp_path / "killed"
    args = _train_args(digits_folder, out, checkpoint, batch_size=4, epochs=12)
    process = subprocess.Popen(_torchrun(*args), env=_env(), cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=open(tmp_path / "killed.log", "w"))
    deadline = time.monotonic() + TIMEOUT
    while not (out / "log.csv").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    for pid in _descendants(process.pid) + [process.pid]:  # torchrun's workers may sit in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)
    time.sleep(0.5)
    assert (out / "log.csv").exists(), (tmp_path / "killed.log").read_text()[-3000:]
    done = len((out / "log.csv").read_text().splitlines()) - 1
    assert 1 <= done < 12, f"killed after {done} epochs"
    result = _run(_torchrun(*args, "--resume"), tmp_path)
    assert f"resuming at epoch {done + 1} of 12" in result.stderr + result.stdout
    epochs = [int(line.split(",")[0]) for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert epochs == list(range(1, 13))
    single = _run(_single(*_train_args(digits_folder, tmp_path / "whole", checkpoint, batch_size=8, epochs=12)),
                  tmp_path)
    assert single.returncode == 0
    resumed = load_file(str(out / "adapter" / "deltavision.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "adapter" / "deltavision.safetensors"))
    assert max((resumed[k] - whole[k]).abs().max().item() for k in whole) < 1e-4


@pytest.mark.slow
def test_compare_runs_each_method_under_torchrun(tmp_path, digits_folder, backbone_checkpoint):
    """compare --nproc 2: the method trains in two processes, and its summary comes back from the main one."""
    from deltavision.compare import CompareConfig, compare
    from deltavision.train.loop import TrainConfig

    config = CompareConfig(
        backbone=VIT, backbone_options=VIT_OPTS, data=str(digits_folder), methods=("lora",), out_dir=str(tmp_path),
        image_size=32, train_limit=48, val_limit=20, pretrained=False, checkpoint=str(backbone_checkpoint("vit")),
        nproc=2, train=TrainConfig(epochs=1, batch_size=4, device="cpu", progress=False),
    )
    rows = compare(config)
    how = json.loads((tmp_path / "lora" / "run.json").read_text())["run"]
    assert how["world_size"] == 2 and how["global_batch"] == 8
    assert rows[0]["method"] == "lora" and rows[0]["val_images"] == 20 and rows[0]["trainable"] > 0


@pytest.mark.slow
def test_segmentation_validation_under_two_processes_counts_every_pixel_once(tmp_path, backbone_checkpoint):
    """Two processes each score half the validation scenes; their confusion matrices are summed, so the
    mIoU, pixel accuracy and per-class IoU they log equal a single process scoring the saved adapter.
    (The head's dropout draws differently in two processes, so their weights are not compared.)"""
    checkpoint = backbone_checkpoint("vit")
    opts = [f"--backbone-opt={k}={v}" for k, v in VIT_OPTS.items()]
    out = tmp_path / "ddp"
    _run(_torchrun(
        "train", "--task", "segmentation", "--head", "fpn", "--data", "fashion-scenes", "--out", str(out),
        "--backbone", VIT, *opts, "--method", "lora", "--checkpoint", str(checkpoint), "--image-size", "32",
        "--train-limit", "16", "--val-limit", "7", "--batch-size", "4", "--epochs", "1", "--device", "cpu",
    ), tmp_path)
    result = _run(_single("eval", str(out / "adapter"), "--checkpoint", str(checkpoint), "--json"), tmp_path)
    single = json.loads(result.stdout.strip().splitlines()[-1])
    header, row = (out / "log.csv").read_text().splitlines()[:2]
    logged = dict(zip(header.split(","), row.split(",")))
    assert single["images"] == 7
    for key in ("miou", "pixel_acc", "val_loss", *(k for k in logged if k.startswith("iou/"))):
        if logged[key] != "nan":
            assert float(logged[key]) == pytest.approx(single[key], rel=1e-4, abs=1e-5), key
