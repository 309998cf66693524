"""timm's training recipe in runs (mixup/cutmix with soft targets, refused settings) and the run loggers
(TensorBoard event files, W&B, csv only)."""

import csv
import importlib.machinery
import math
import sys
import types
from dataclasses import replace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.loss import SoftTargetCrossEntropy

from deltavision.train import RunConfig, TrainConfig, resolve_run, run_training
from deltavision.train import loggers, loop, recipe
from deltavision.train.loggers import LoggerUnavailableError
from deltavision.train.objectives import ClassificationObjective
from deltavision.train.run import RecipeError

from conftest import TINY

VIT, VIT_OPTS = TINY["vit"]


def _config(data, out, ckpt=None, **changes) -> RunConfig:
    train = changes.pop("train", TrainConfig(epochs=1, batch_size=16, lr=1e-2, progress=False, seed=3))
    config = RunConfig(
        backbone=VIT, method="ssf", data=str(data), out_dir=str(out), image_size=32, pretrained=False,
        checkpoint=str(ckpt) if ckpt else None, backbone_options=VIT_OPTS, train=train,
    )
    return replace(config, **changes)


def _read_log(out) -> list[dict]:
    with open(out / loop.LOG, newline="") as handle:
        return list(csv.DictReader(handle))


def _events(out) -> EventAccumulator:
    accumulator = EventAccumulator(str(out))
    accumulator.Reload()
    return accumulator


# --- mixup / cutmix -------------------------------------------------------------------------------


def test_mixup_trains_on_soft_targets_with_the_soft_target_loss(tmp_path, monkeypatch, digits_folder,
                                                                 backbone_checkpoint):
    """Every training batch reaches the loss as mixed soft targets (label-smoothed, two classes per row
    when mixed), and the loss is soft-target cross-entropy."""
    seen = []

    class RecordingSoftTarget(SoftTargetCrossEntropy):
        def forward(self, logits, targets):
            loss = super().forward(logits, targets)
            seen.append((logits.detach(), targets, loss.detach()))
            return loss

    monkeypatch.setattr(recipe, "SoftTargetCrossEntropy", RecordingSoftTarget)
    train = TrainConfig(epochs=1, batch_size=16, lr=1e-2, progress=False, seed=3, mixup=0.8, label_smoothing=0.1)
    run_training(_config(digits_folder, tmp_path / "run", backbone_checkpoint("vit"), train=train))
    assert len(seen) == 60 // 16  # 60 training images: the ragged last batch is dropped (mixing pairs images)
    for logits, targets, loss in seen:
        assert targets.shape == (16, 10) and targets.dtype.is_floating_point
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(16))
        assert targets.max() < 1.0  # smoothed, never one-hot
        expected = -(targets * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
        torch.testing.assert_close(loss, expected)
    mixed_rows = sum(int((t > 0.1).sum(dim=1).gt(1).sum()) for _, t, _ in seen)
    assert mixed_rows > 0  # some rows carry two classes: the images were mixed


def test_without_mixup_the_loss_is_label_smoothed_cross_entropy():
    objective = ClassificationObjective(num_classes=10)
    plain = TrainConfig(label_smoothing=0.2)
    criterion = objective.criterion(plain)
    assert isinstance(criterion, torch.nn.CrossEntropyLoss) and criterion.label_smoothing == 0.2
    assert objective.mixer(plain) is None and not objective.drop_last(plain)
    mixing = TrainConfig(cutmix=1.0)
    assert isinstance(objective.criterion(mixing), SoftTargetCrossEntropy) and objective.drop_last(mixing)
    images, targets = objective.mixer(mixing)(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert images.shape == (4, 3, 8, 8) and targets.shape == (4, 10)


# --- settings refused before anything loads --------------------------------------------------------


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"train": TrainConfig(mixup=0.8, batch_size=15)}, "--batch-size must be even, not 15"),
        ({"auto_augment": "rand-q9"}, "--auto-augment 'rand-q9' is not a timm policy"),
        ({"auto_augment": "no-such-policy"}, "--auto-augment 'no-such-policy' is not a timm policy"),
        ({"task": "segmentation", "train": TrainConfig(cutmix=1.0)}, "--cutmix apply to classification only"),
        ({"task": "segmentation", "reprob": 0.25}, "--reprob apply to classification only"),
        ({"train": TrainConfig(logger="mlflow")}, "--logger 'mlflow' is not one of"),
    ],
)
def test_recipe_settings_that_cannot_apply_are_refused(changes, message, tmp_path):
    with pytest.raises((RecipeError, LoggerUnavailableError), match=message):
        resolve_run(_config("digits", tmp_path / "run", **changes))


# --- loggers ---------------------------------------------------------------------------------------


def test_auto_logger_is_tensorboard_when_installed_else_csv(monkeypatch):
    assert loggers.resolve_logger("auto") == "tensorboard"
    monkeypatch.setattr(loggers, "_installed", lambda package: False)
    assert loggers.resolve_logger("auto") == "csv"
    with pytest.raises(LoggerUnavailableError, match=r"--logger wandb needs the wandb package: pip install"):
        loggers.resolve_logger("wandb")
    with pytest.raises(LoggerUnavailableError, match="--logger tensorboard needs the tensorboard package"):
        loggers.resolve_logger("tensorboard")


def test_csv_logger_writes_no_event_files(tmp_path, digits_folder, backbone_checkpoint):
    train = TrainConfig(epochs=1, batch_size=16, lr=1e-2, progress=False, logger="csv")
    out = tmp_path / "run"
    run_training(_config(digits_folder, out, backbone_checkpoint("vit"), train=train, train_limit=20))
    assert not list(out.glob("events.out.tfevents.*"))
    row = _read_log(out)[0]
    assert float(row["process_peak_memory_mb"]) > 0 and float(row["images_per_s"]) > 0


def test_wandb_logger_logs_each_epoch_and_resumes_the_same_run(tmp_path, monkeypatch):
    """The W&B logger against a recording stand-in for the wandb module (no account, no network)."""
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init, fake.util = init, types.SimpleNamespace(generate_id=lambda: "abc123")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = loggers.open_logger("wandb", tmp_path, settings={"lr": 0.01})
    logger.log({"epoch": 1, "train_loss": 0.5, "top1": 80.0, "iou/cat": math.nan, "lr": 0.01, "images_per_s": 9.0})
    logger.close()
    init_kwargs = calls[0][1]
    assert init_kwargs["id"] == "abc123" and init_kwargs["config"] == {"lr": 0.01}
    assert calls[1] == ("log", {"train/loss": 0.5, "val/top1": 80.0, "train/lr": 0.01,
                                "system/images_per_s": 9.0, "epoch": 1}, 1)
    assert calls[2] == ("finish",)
    fake.util.generate_id = lambda: pytest.fail("a resumed run must continue its W&B run")
    loggers.open_logger("wandb", tmp_path, first_epoch=2)
    assert calls[-1][1]["id"] == "abc123"


def test_segmentation_run_logs_its_own_metrics_to_tensorboard(tmp_path, backbone_checkpoint):
    """The segmentation objective trains through the same loop; its metrics (mIoU, pixel accuracy, IoU per
    class) are the event files' scalars."""
    out = tmp_path / "seg"
    train = TrainConfig(epochs=1, batch_size=4, lr=1e-2, progress=False, seed=0)
    config = _config("fashion-scenes", out, backbone_checkpoint("vit"), train=train, task="segmentation",
                     head="fpn", train_limit=8, val_limit=3)
    summary = run_training(config)
    row = _read_log(out)[0]
    tags = set(_events(out).Tags()["scalars"])
    assert {"val/miou", "val/pixel_acc", "val/loss", "train/loss", "train/lr", "val/iou/background"} <= tags
    logged = _events(out).Scalars("val/miou")
    assert [e.step for e in logged] == [1] and logged[0].value == pytest.approx(float(row["miou"]), rel=1e-6)
    assert summary["miou"] == pytest.approx(float(row["miou"]))
