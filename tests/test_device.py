"""Devices and precisions on a machine without a GPU: bf16 on the CPU trains, what cannot run is refused."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import deltavision
from deltavision.train.device import DeviceError, check_precision, resolve_device
from deltavision.train.loop import TrainConfig
from deltavision.train.run import RunConfig, run_training

from conftest import TINY

VIT, VIT_OPTS = TINY["vit"]


def test_auto_is_the_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name,message", [
    ("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU"), ("mps", "MPS is not available"), ("tpu", "unknown device"),
    ("cuda:x", "unknown device"),
])
def test_a_device_that_does_not_exist_is_one_clear_error(monkeypatch, name, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=message):
        resolve_device(name)


def test_fp16_on_the_cpu_is_refused_and_bf16_is_not():
    with pytest.raises(DeviceError, match="fp16 needs a GPU"):
        check_precision(torch.device("cpu"), "fp16")
    assert check_precision(torch.device("cpu"), "bf16") is torch.bfloat16
    with pytest.raises(DeviceError, match="unknown precision"):
        check_precision(torch.device("cpu"), "fp8")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, digits_folder, backbone_checkpoint):
    out = tmp_path_factory.mktemp("bf16") / "run"
    run_training(RunConfig(
        backbone=VIT, method="lora", data=str(digits_folder), out_dir=str(out), image_size=32, pretrained=False,
        checkpoint=str(backbone_checkpoint("vit")), backbone_options=VIT_OPTS, augment=False,
        train=TrainConfig(epochs=4, batch_size=16, lr=1e-2, progress=False, precision="bf16", device="cpu"),
    ))
    return out


def test_bf16_training_on_the_cpu_runs_and_its_loss_falls(bf16_run):
    rows = (bf16_run / "log.csv").read_text().strip().splitlines()[1:]
    losses = [float(row.split(",")[1]) for row in rows]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_a_bf16_run_saves_float32_tensors_that_load_into_an_fp32_model(bf16_run, backbone_checkpoint):
    from safetensors.torch import load_file

    saved = load_file(str(bf16_run / "adapter" / "deltavision.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    model = deltavision.load_adapter(bf16_run / "adapter", pretrained=False, checkpoint=backbone_checkpoint("vit"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(model.eval()(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.parametrize("flags,message", [(["--device", "cuda"], "no CUDA GPU"),
                                           (["--precision", "fp16", "--device", "cpu"], "fp16 needs a GPU")])
def test_cli_refuses_a_device_or_precision_before_any_work(tmp_path, digits_folder, flags, message):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "deltavision", "train", "--data", str(digits_folder), "--out", str(tmp_path / "r"),
         *flags], capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def _tiny_run(tmp_path, digits_folder, backbone_checkpoint, method, **changes):
    from dataclasses import replace

    config = RunConfig(
        backbone=VIT, method=method, data=str(digits_folder), out_dir=str(tmp_path / method), image_size=32,
        pretrained=False, checkpoint=str(backbone_checkpoint("vit")), backbone_options=VIT_OPTS, augment=False,
        train_limit=16, val_limit=10, train=TrainConfig(epochs=1, batch_size=8, lr=1e-2, progress=False, device="cpu"),
    )
    return run_training(replace(config, **changes))


def test_grad_checkpointing_trains_where_the_backbone_backpropagates(tmp_path, digits_folder, backbone_checkpoint):
    summary = _tiny_run(tmp_path, digits_folder, backbone_checkpoint, "ssf", grad_checkpointing=True)
    assert summary["epochs"] == 1 and math.isfinite(summary["train_loss"])


@pytest.mark.parametrize("method", ["e3va", "linear"])
def test_grad_checkpointing_is_refused_where_it_saves_nothing(tmp_path, digits_folder, backbone_checkpoint, method):
    from deltavision.errors import DeltaVisionError

    with pytest.raises(DeltaVisionError, match="never runs; drop the flag"):
        _tiny_run(tmp_path, digits_folder, backbone_checkpoint, method, grad_checkpointing=True)


def test_grad_accumulation_steps_once_per_group_of_micro_batches(tmp_path, digits_folder, backbone_checkpoint):
    """16 images, batch 4, accumulation 2: two optimizer steps per epoch, seen in the schedule: after the
    first epoch (the 2-step warm-up) the rate is the peak, not warmed up further nor decayed to zero."""
    config_changes = {"train": TrainConfig(epochs=2, batch_size=4, lr=1e-2, progress=False, device="cpu",
                                           grad_accum=2, warmup_epochs=1.0)}
    _tiny_run(tmp_path, digits_folder, backbone_checkpoint, "lora", **config_changes)
    with open(tmp_path / "lora" / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[0]["lr"]) == pytest.approx(1e-2)
    how = json.loads((tmp_path / "lora" / "run.json").read_text())["run"]
    assert how["global_batch"] == 8 and how["grad_accum"] == 2
