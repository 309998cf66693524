"""Training runs on real data: logs, plots, checkpoints, adapters, resuming and refusing to overwrite."""

import csv
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import deltavision
from deltavision.errors import AdapterFileError, ArtifactExistsError
from deltavision.inference import evaluate_saved_adapter
from deltavision.train import RunConfig, TrainConfig, run_training
from deltavision.train.run import RunConflictError
from deltavision.train import loop

from conftest import TINY, file_snapshot

VIT, VIT_OPTS = TINY["vit"]
EPOCHS = 2


def _config(data, out_dir, ckpt=None, **changes) -> RunConfig:
    train = TrainConfig(
        epochs=changes.pop("epochs", EPOCHS), batch_size=changes.pop("batch_size", 16), lr=1e-2, progress=False, seed=3
    )
    config = RunConfig(
        backbone=VIT, method="ssf", data=str(data), out_dir=str(out_dir), image_size=32, pretrained=False,
        checkpoint=str(ckpt) if ckpt else None, backbone_options=VIT_OPTS, train=train,
    )
    return replace(config, **changes)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_folder, backbone_checkpoint):
    """A finished 2-epoch SSF run of the tiny ViT on the real digits folder: (out dir, summary)."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    summary = run_training(_config(digits_folder, out, backbone_checkpoint("vit")))
    return out, summary


def _read_log(out):
    with open(out / loop.LOG, newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_writes_log_plot_checkpoint_and_adapter(finished_run):
    out, summary = finished_run
    rows = _read_log(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert {"train_loss", "val_loss", "top1", "top5", "lr"} <= set(row)
        top1, top5 = float(row["top1"]), float(row["top5"])
        assert 0.0 <= top1 <= top5 <= 100.0
        assert float(row["train_loss"]) > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter" / "deltavision.safetensors").is_file()
    config = json.loads((out / "adapter" / "deltavision.json").read_text())
    assert config["classes"] == [str(d) for d in range(10)] and config["num_classes"] == 10
    assert config["data"]["image_size"] == 32
    with safe_open(str(out / loop.CHECKPOINT), framework="pt") as handle:
        state = json.loads(handle.metadata()["state"])
    assert state["epoch"] == EPOCHS and len(state["history"]) == EPOCHS
    assert summary["epochs"] == EPOCHS
    assert summary["top1"] == pytest.approx(float(rows[-1]["top1"]))
    assert 0 < summary["trainable"] < summary["total"]


def test_tensorboard_event_files_hold_every_logged_scalar(finished_run):
    """By default (tensorboard installed) the run folder holds event files whose scalars, one per epoch,
    are log.csv's: learning rate, losses, top-1/top-5, peak memory and throughput."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = finished_run
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(out))
    events.Reload()
    columns = {"train/lr": "lr", "train/loss": "train_loss", "val/loss": "val_loss", "val/top1": "top1",
               "val/top5": "top5", "system/process_peak_memory_mb": "process_peak_memory_mb", "system/images_per_s": "images_per_s"}
    assert set(events.Tags()["scalars"]) == set(columns)
    rows = _read_log(out)
    for tag, column in columns.items():
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2]
        assert [e.value for e in logged] == pytest.approx([float(r[column]) for r in rows], rel=1e-6)
    assert all(float(r["process_peak_memory_mb"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)


def test_saved_adapter_evaluates_to_the_logged_accuracy(finished_run, backbone_checkpoint):
    out, _ = finished_run
    metrics = evaluate_saved_adapter(out / "adapter", None, 64, None, backbone_checkpoint("vit"), False)
    last = _read_log(out)[-1]
    assert metrics["images"] == 20
    assert metrics["top1"] == pytest.approx(float(last["top1"]))
    assert metrics["val_loss"] == pytest.approx(float(last["val_loss"]), rel=1e-5)


def test_existing_run_is_not_overwritten(finished_run, digits_folder, backbone_checkpoint):
    out, _ = finished_run
    before = file_snapshot(out)
    with pytest.raises(ArtifactExistsError, match="--resume"):
        run_training(_config(digits_folder, out, backbone_checkpoint("vit")))
    assert file_snapshot(out) == before


def test_overwrite_starts_the_run_afresh(tmp_path, finished_run, digits_folder, backbone_checkpoint):
    out = tmp_path / "copy"
    shutil.copytree(finished_run[0], out)
    run_training(_config(digits_folder, out, backbone_checkpoint("vit"), overwrite=True, epochs=1))
    assert [int(r["epoch"]) for r in _read_log(out)] == [1]


class SimulatedCrash(RuntimeError):
    pass


def _crash_in_epoch(monkeypatch, crash_epoch):
    """Make the loop die at the start of 0-based ``crash_epoch``, as a killed process would."""
    real = loop._train_one_epoch

    def dying(run, loader, epoch):
        if epoch == crash_epoch:
            raise SimulatedCrash(f"killed in epoch {epoch + 1}")
        return real(run, loader, epoch)

    monkeypatch.setattr(loop, "_train_one_epoch", dying)


def _run_seeded(config):
    # run_training does not seed torch's global RNG itself (see test_same_seed_gives_the_same_adapter);
    # seeding here gives every run the same initial head/SSF tensors, so the comparison isolates resuming.
    torch.manual_seed(0)
    return run_training(config)


def _adapter(out):
    return load_file(str(out / "adapter" / "deltavision.safetensors"))


# SSF's recipe: RandAugment, random erasing, mixup and cutmix (timm's, drawing on Python's and NumPy's RNGs).
RECIPE = {"augment": True, "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25}
RECIPE_TRAIN = {"mixup": 0.8, "cutmix": 1.0}


@pytest.mark.parametrize("recipe", ["no-augment", "augment", "ssf-recipe"])
def test_resume_after_a_crash_matches_an_uninterrupted_run(recipe, tmp_path, monkeypatch, digits_folder, backbone_checkpoint):
    ckpt = backbone_checkpoint("vit")
    settings = {"no-augment": {"augment": False}, "augment": {"augment": True}, "ssf-recipe": RECIPE}[recipe]

    def config(out, **changes):
        base = _config(digits_folder, out, ckpt, **settings, **changes)
        if recipe == "ssf-recipe":
            base = replace(base, train=replace(base.train, **RECIPE_TRAIN))
        return base

    _run_seeded(config(tmp_path / "straight"))

    crashed = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        _crash_in_epoch(patch, crash_epoch=1)
        with pytest.raises(SimulatedCrash):
            _run_seeded(config(crashed))
    assert (crashed / loop.CHECKPOINT).is_file() and not (crashed / "adapter").exists()
    assert [int(r["epoch"]) for r in _read_log(crashed)] == [1]
    _run_seeded(config(crashed, resume=True))

    straight_log, resumed_log = _read_log(tmp_path / "straight"), _read_log(crashed)
    assert [r["epoch"] for r in resumed_log] == ["1", "2"]
    assert [float(r["lr"]) for r in resumed_log] == pytest.approx([float(r["lr"]) for r in straight_log])
    expected, resumed = _adapter(tmp_path / "straight"), _adapter(crashed)
    assert set(expected) == set(resumed)
    worst = max((expected[k] - resumed[k]).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by up to {worst:.3g}"
    assert [float(r["top1"]) for r in resumed_log] == [float(r["top1"]) for r in straight_log]


def test_same_seed_gives_the_same_adapter(tmp_path, digits_folder, backbone_checkpoint):
    """Two runs with the same config and seed (backbone weights from the same file) train the same tensors."""
    ckpt = backbone_checkpoint("vit")
    first = run_training(_config(digits_folder, tmp_path / "a", ckpt, epochs=1, augment=False))
    second = run_training(_config(digits_folder, tmp_path / "b", ckpt, epochs=1, augment=False))
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst == 0.0, f"same seed, different adapters (max difference {worst:.3g})"
    assert first["top1"] == second["top1"]


CHECKPOINT_DAMAGE = {
    "random bytes": lambda path: path.write_bytes(bytes(range(256)) * 16),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:100]),
}


@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGE))
def test_corrupt_checkpoint_on_resume_is_an_adapter_file_error(damage, tmp_path, finished_run, digits_folder, backbone_checkpoint):
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    CHECKPOINT_DAMAGE[damage](out / loop.CHECKPOINT)
    with pytest.raises(AdapterFileError, match="checkpoint"):
        run_training(_config(digits_folder, out, backbone_checkpoint("vit"), resume=True))


def test_resume_with_another_method_is_refused_naming_it(tmp_path, finished_run, digits_folder, backbone_checkpoint):
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    with pytest.raises(RunConflictError, match="method: the run has 'ssf', asked 'bitfit'"):
        run_training(_config(digits_folder, out, backbone_checkpoint("vit"), resume=True, method="bitfit"))


def test_resume_without_a_run_file_still_checks_the_checkpoint(tmp_path, finished_run, digits_folder, backbone_checkpoint):
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    (out / "run.json").unlink()
    with pytest.raises(AdapterFileError, match="does not fit"):
        run_training(_config(digits_folder, out, backbone_checkpoint("vit"), resume=True, method="bitfit"))


def test_resume_with_another_batch_size_is_refused(tmp_path, finished_run, digits_folder, backbone_checkpoint):
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    with pytest.raises(RunConflictError, match="train.batch_size: the run has 16, asked 32"):
        run_training(_config(digits_folder, out, backbone_checkpoint("vit"), resume=True, batch_size=32))


def test_resume_of_a_finished_run_trains_no_more(tmp_path, finished_run, digits_folder, backbone_checkpoint):
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    before = _adapter(out)
    summary = run_training(_config(digits_folder, out, backbone_checkpoint("vit"), resume=True))
    assert summary["epochs"] == EPOCHS
    after = _adapter(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_method_option_fails_before_writing_anything(tmp_path, digits_folder):
    out = tmp_path / "run"
    with pytest.raises(deltavision.errors.MethodOptionError):
        run_training(_config(digits_folder, out, options={"nope": "1"}))
    assert not out.exists()


@pytest.fixture(scope="module")
def flat_digits(tmp_path_factory):
    """Real digits in the flat class-folder layout (split by --val-fraction), 10 per class."""
    from sklearn.datasets import load_digits

    from deltavision.data import write_image_folder

    digits = load_digits()
    keep = np.concatenate([np.flatnonzero(digits.target == c)[:10] for c in range(10)])
    root = tmp_path_factory.mktemp("assets") / "flat"
    return write_image_folder(root, digits.images[keep], digits.target[keep], [str(c) for c in range(10)], split=False)


def test_eval_scores_exactly_the_runs_validation_split(tmp_path, flat_digits, backbone_checkpoint):
    """A run with its own seed and validation fraction: eval rebuilds that split, not the defaults'."""
    out = tmp_path / "seeded"
    config = _config(flat_digits, out, backbone_checkpoint("vit"), epochs=1, val_fraction=0.3)
    run_training(replace(config, train=replace(config.train, seed=1)))
    metrics = evaluate_saved_adapter(out / "adapter", None, 64, None, backbone_checkpoint("vit"), False)
    last = _read_log(out)[-1]
    assert metrics["images"] == 30 and metrics["warnings"] == []
    assert metrics["val_loss"] == pytest.approx(float(last["val_loss"]), rel=1e-5)
    assert json.loads((out / "run.json").read_text())["settings"]["train"]["seed"] == 1


def test_eval_on_other_data_warns_that_it_is_not_the_runs_split(finished_run, three_class_folder, digits_folder,
                                                                  backbone_checkpoint):
    out, _ = finished_run
    metrics = evaluate_saved_adapter(out / "adapter", None, 64, 5, backbone_checkpoint("vit"), False)
    assert metrics["images"] == 5 and "differs from the run's" in metrics["warnings"][0]
