"""Guards a new user relies on without seeing them: file writes, adapter checks, training invariants.

Each test here fails on a specific bug that once went unnoticed: files written 0600 whatever the
umask, a failed write leaving a temporary file or a traceback, a torn checkpoint, NaN weights or
a NaN loss passing silently, a resumed checkpoint kept memory-mapped, weight decay on biases and
scales, top-5 computed as top-3, LoRA's alpha/rank scaling, and the learning-rate schedule.
"""

import csv
import json
import math
import os
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deltavision
from deltavision import io
from deltavision import backbones
from deltavision.errors import (
    AdapterFileError, DeltaVisionError, NewerVersionWarning, NonFiniteLossError, WeightsUnavailableError,
)
from deltavision.methods.lora import LoRALinear
from deltavision.model.state import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config
from deltavision.train import RunConfig, TrainConfig, run_training
from deltavision.train import loop, recipe
from deltavision.train.checkpoint import load_checkpoint

from conftest import TINY, random_images, tiny_model

VIT, VIT_OPTS = TINY["vit"]


def _run_config(data, out, ckpt, **changes) -> RunConfig:
    train = TrainConfig(epochs=2, batch_size=16, lr=1e-2, progress=False, seed=3)
    config = RunConfig(
        backbone=VIT, method="ssf", data=str(data), out_dir=str(out), image_size=32, pretrained=False,
        checkpoint=str(ckpt), backbone_options=VIT_OPTS, train=train,
    )
    return replace(config, **changes)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).rglob("*.tmp"))


# --- file writes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_the_umask_allows(umask, mode, tmp_path):
    previous = os.umask(umask)
    try:
        io.save_tensors({"a": torch.zeros(2)}, tmp_path / "t.safetensors")
        io.save_json({"a": 1}, tmp_path / "c.json")
    finally:
        os.umask(previous)
    for name in ("t.safetensors", "c.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def _dies_halfway(error):
    """A save_file stand-in that writes part of the file, then fails like a full disk."""

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise error

    return save_file


@pytest.mark.parametrize(
    "error", [SafetensorError("No space left on device (os error 28)"), OSError(28, "No space left on device")],
    ids=["SafetensorError", "OSError"],
)
def test_a_failed_tensor_write_is_one_error_and_keeps_the_old_file(error, tmp_path, monkeypatch):
    target = tmp_path / "t.safetensors"
    io.save_tensors({"a": torch.ones(3)}, target)
    before = target.read_bytes()
    monkeypatch.setattr(io, "save_file", _dies_halfway(error))
    with pytest.raises(DeltaVisionError, match="could not write .*t.safetensors.*No space left"):
        io.save_tensors({"a": torch.zeros(3)}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_an_unwritable_output_folder_is_one_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DeltaVisionError, match="cannot write to .*a-file/run"):
        io.ensure_writable_dir(blocker / "run")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    with pytest.raises(DeltaVisionError, match="could not write .*x.json: Permission denied"):
        io.save_json({}, tmp_path / "x.json")


def test_a_checkpoint_write_that_fails_partway_keeps_the_previous_one_resumable(
    tmp_path, monkeypatch, digits_folder, backbone_checkpoint
):
    ckpt, out = backbone_checkpoint("vit"), tmp_path / "run"
    checkpoint, real_save, kept = out / loop.CHECKPOINT, io.save_file, {}

    def save_then_fill_the_disk(tensors, filename, metadata=None):
        if kept:  # the second epoch's checkpoint: the disk is full
            _dies_halfway(OSError(28, "No space left on device"))(tensors, filename, metadata)
        real_save(tensors, filename, metadata=metadata)
        kept["epoch 1"] = True

    with monkeypatch.context() as patch:
        patch.setattr(io, "save_file", save_then_fill_the_disk)
        with pytest.raises(DeltaVisionError, match="No space left"):
            run_training(_run_config(digits_folder, out, ckpt))
    with safe_open(str(checkpoint), framework="pt") as handle:
        assert json.loads(handle.metadata()["state"])["epoch"] == 1
    assert _leftovers(out) == []
    summary = run_training(_run_config(digits_folder, out, ckpt, resume=True))
    assert summary["epochs"] == 2


def test_a_loaded_checkpoint_is_not_left_mapped(tmp_path, digits_folder, backbone_checkpoint):
    """safetensors' load_file maps the file; a resumed run must not keep the old checkpoint's space."""
    maps = Path("/proc/self/maps")  # Linux, where the tests run
    out = tmp_path / "run"
    run_training(_run_config(digits_folder, out, backbone_checkpoint("vit"), train=TrainConfig(epochs=1, progress=False)))
    model = tiny_model("vit", "ssf", num_classes=10)
    optimizer = recipe.make_optimizer(model, TrainConfig(lr=1e-3))
    load_checkpoint(out / loop.CHECKPOINT, model, optimizer)
    assert str(out / loop.CHECKPOINT) not in maps.read_text()


# --- adapter files -------------------------------------------------------------------------------


@pytest.fixture
def saved_adapter(tmp_path):
    model = tiny_model("vit", "ssf")
    return model, deltavision.save_adapter(model, tmp_path / "adapter")


def _edit_config(directory: Path, **changes) -> None:
    path = directory / ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "key,value",
    [("seed", "abc"), ("num_classes", "x"), ("num_classes", True), ("num_classes", 0), ("backbone", 3),
     ("options", [1]), ("classes", "abc")],
)
def test_adapter_config_values_of_the_wrong_type_are_refused(key, value, saved_adapter):
    _, directory = saved_adapter
    _edit_config(directory, **{key: value})
    with pytest.raises(AdapterFileError, match=f"{ADAPTER_CONFIG}: {key} should be"):
        read_adapter_config(directory)


def test_an_adapter_from_a_newer_version_warns(saved_adapter):
    model, directory = saved_adapter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deltavision.load_adapter(directory, model)  # this version's own adapter: no warning
    _edit_config(directory, deltavision_version="99.1.0")
    with pytest.warns(NewerVersionWarning, match="99.1.0"):
        deltavision.load_adapter(directory, model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adapter_tensors_with_nan_or_inf_are_refused(bad, saved_adapter):
    model, directory = saved_adapter
    tensors = io.load_tensors(directory / ADAPTER_WEIGHTS)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone().flatten().index_fill(0, torch.tensor([0]), bad).view_as(tensors[name])
    io.save_tensors(tensors, directory / ADAPTER_WEIGHTS)
    with pytest.raises(AdapterFileError, match=rf"{ADAPTER_WEIGHTS}.*{name.replace('.', '[.]')}"):
        deltavision.load_adapter(directory, model)


# --- training ------------------------------------------------------------------------------------


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, digits_folder, backbone_checkpoint
):
    real = loop._train_one_epoch

    def poisoned(run, loader, epoch):
        if epoch == 1:
            with torch.no_grad():
                run.model.get_classifier().weight.fill_(float("nan"))
        return real(run, loader, epoch)

    monkeypatch.setattr(loop, "_train_one_epoch", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"loss became non-finite \(nan\) at epoch 2, batch 1"):
        run_training(_run_config(digits_folder, out, backbone_checkpoint("vit")))
    state = json.loads(_checkpoint_metadata(out / loop.CHECKPOINT)["state"])
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in io.load_tensors(out / loop.CHECKPOINT).values())


def _checkpoint_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_weight_decay_skips_biases_norms_and_ssf_factors():
    model = tiny_model("vit", "ssf")
    groups = recipe.make_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.05)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    assert decay == {"head.weight"}
    assert {n for n in trainable if "ssf" in n or n.endswith("bias")} <= no_decay

    norm_model = tiny_model("vit", "norm")
    groups = recipe.make_optimizer(norm_model, TrainConfig(lr=1e-3, weight_decay=0.05)).param_groups
    names = {id(p): n for n, p in norm_model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    norms = {f"{n}.{p}" for n, m in norm_model.named_modules() if isinstance(m, nn.LayerNorm) for p in ("weight", "bias")}
    assert norms and norms <= no_decay


class FixedLogits(nn.Module):
    """A "model" that returns the logits it was given as its input."""

    def forward(self, x):
        return x


def test_top5_counts_ranks_four_and_five_but_not_six():
    logits = torch.tensor([[10.0, 9, 8, 7, 6, 5, 4]]).repeat(4, 1)
    labels = torch.tensor([0, 3, 4, 5])  # label ranks 1st, 4th, 5th, 6th
    metrics = loop.evaluate(FixedLogits(), DataLoader(TensorDataset(logits, labels), batch_size=3))
    assert metrics["top1"] == pytest.approx(25.0)
    assert metrics["top5"] == pytest.approx(75.0)


def test_lora_alpha_other_than_rank_scales_the_unmerged_and_merged_model_alike():
    model = tiny_model("vit", "lora", rank=2, alpha=7)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_b" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers
    for layer in layers:
        third = layer.base.out_features // 3
        delta = torch.zeros_like(layer.base.weight)
        delta[:third] = 3.5 * layer.lora_b["q"] @ layer.lora_a["q"]
        delta[2 * third :] = 3.5 * layer.lora_b["v"] @ layer.lora_a["v"]
        x = torch.randn(3, layer.base.in_features, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.base(x) + x @ delta.T, atol=1e-5, rtol=1e-5)
    x = random_images(batch=2, seed=6)
    with torch.no_grad():
        unmerged = model.eval()(x)
        merged = deltavision.merge(model).eval()(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def _expected_lr(step: int, base: float, warmup: int, total: int, start: float = 1e-6, end: float = 0.0) -> float:
    """timm's CosineLRScheduler with a warm-up prefix, written out: linear from ``start``, then cosine to ``end``."""
    if step < warmup:
        return start + step * (base - start) / warmup
    return end + (base - end) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_the_learning_rate_warms_up_then_follows_a_cosine(tmp_path, monkeypatch, digits_folder, backbone_checkpoint):
    """The learning rate of every optimizer step, read inside training: linear warm-up from ``warmup_lr``
    over ``warmup_epochs``, then a half cosine to ``min_lr`` at the last step; log.csv holds the rate
    after each epoch's last step."""
    used = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            used.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(recipe.torch.optim, "AdamW", RecordingAdamW)
    out = tmp_path / "run"
    train = TrainConfig(epochs=3, batch_size=8, lr=0.02, warmup_epochs=1.0, warmup_lr=1e-4, min_lr=1e-3,
                        progress=False)
    run_training(_run_config(digits_folder, out, backbone_checkpoint("vit"), train=train))
    steps_per_epoch = math.ceil(60 / 8)  # the digits folder holds 60 training images
    total, warmup = 3 * steps_per_epoch, steps_per_epoch

    def expected(step):
        return _expected_lr(step, 0.02, warmup, total, start=1e-4, end=1e-3)

    assert len(used) == total
    assert used == pytest.approx([expected(s) for s in range(total)])
    assert used[0] == pytest.approx(1e-4) and max(used) == pytest.approx(0.02)
    with open(out / loop.LOG, newline="") as handle:
        logged = [float(row["lr"]) for row in csv.DictReader(handle)]
    assert logged == pytest.approx([expected(s) for s in (8, 16, 24)], abs=1e-12)
    assert logged[-1] == pytest.approx(1e-3)


# --- missing pretrained weights ------------------------------------------------------------------


def _forbid(what):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} was called")

    return refuse


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or download weights fails the test."""
    import socket

    import timm.models._builder as builder

    monkeypatch.setattr(socket, "create_connection", _forbid("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", _forbid("socket.getaddrinfo"))
    monkeypatch.setattr(builder, "load_pretrained", _forbid("timm's load_pretrained"))


def test_offline_missing_weights_fail_without_trying_the_network(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE is set.*--checkpoint"):
        deltavision.create_model("vit_tiny_patch16_224", "ssf", 3)


def test_unreachable_hub_fails_after_one_quick_probe(no_network, monkeypatch):
    """Without HF_HUB_OFFLINE, one short connection attempt decides; timm's minute of retries never starts."""
    from huggingface_hub import constants

    probed = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbones, "_reachable", lambda host, timeout=3.0: probed.append(host) or False)
    with pytest.raises(WeightsUnavailableError, match="cannot be reached.*--checkpoint"):
        deltavision.create_model("vit_tiny_patch16_224", "ssf", 3)
    assert len(probed) == 1
