"""Segmentation runs: train (and resume) on fashion-scenes, the log and plot, eval, predict overlays, merge."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import deltavision
from deltavision.cli import app
from deltavision.data import load_scenes
from deltavision.errors import DataError
from deltavision.inference import evaluate_saved_adapter, merge_saved_adapter
from deltavision.predict import predict_images
from deltavision.train import RunConfig, TrainConfig, run_training
from deltavision.train.objectives import SegmentationObjective

from conftest import TINY

runner = CliRunner()
SCENE_CLASSES = 11


def _config(out: Path, method: str = "ssf", epochs: int = 1, resume: bool = False, head: str | None = "fpn"):
    name, opts = TINY["convnext"]
    return RunConfig(
        backbone=name, method=method, data="fashion-scenes", out_dir=str(out), task="segmentation", head=head,
        image_size=32, train_limit=12, val_limit=4, pretrained=False, backbone_options=opts, resume=resume,
        train=TrainConfig(epochs=epochs, batch_size=4, lr=1e-3, progress=False),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("seg-run")
    return out, run_training(_config(out))


def test_training_writes_segmentation_metrics_plot_and_adapter(trained):
    out, summary = trained
    assert summary["task"] == "segmentation" and 0.0 <= summary["miou"] <= 100.0
    assert summary["train_images"] == 12 and summary["num_classes"] == SCENE_CLASSES
    with open(out / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    assert {"miou", "pixel_acc", "val_loss", "iou/background", "iou/Ankle boot"} <= set(rows[0])
    assert float(rows[0]["miou"]) == pytest.approx(summary["miou"])
    assert (out / "curves.png").stat().st_size > 1000
    config = deltavision.model.read_adapter_config(out / "adapter")
    assert (config["task"], config["head"], config["num_classes"]) == ("segmentation", "fpn", SCENE_CLASSES)
    assert config["classes"][0] == "background"


def test_a_crashed_segmentation_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    whole = run_training(_config(tmp_path / "whole", epochs=2))
    evaluate, calls = SegmentationObjective.evaluate, []

    def crash_in_epoch_two(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(SegmentationObjective, "evaluate", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run_training(_config(tmp_path / "crashed", epochs=2))
    monkeypatch.setattr(SegmentationObjective, "evaluate", evaluate)
    resumed = run_training(_config(tmp_path / "crashed", epochs=2, resume=True))
    with open(tmp_path / "crashed" / "log.csv") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]
    assert resumed["miou"] == pytest.approx(whole["miou"], abs=1e-6)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)


def test_eval_reports_the_runs_miou_and_every_class(trained):
    out, summary = trained
    metrics = evaluate_saved_adapter(out / "adapter", None, 8, None, None, False)
    assert metrics["task"] == "segmentation" and metrics["images"] == 4
    assert metrics["miou"] == pytest.approx(summary["miou"], abs=1e-6)
    assert len([k for k in metrics if k.startswith("iou/")]) == SCENE_CLASSES
    result = runner.invoke(app, ["eval", str(out / "adapter"), "--no-pretrained"])
    assert result.exit_code == 0, result.output
    assert "Ankle boot" in result.output and re.search(r"mIoU \d+\.\d\d%", result.output)


def test_predict_writes_an_overlay_png_the_size_of_each_image(trained, tmp_path):
    out, _ = trained
    scenes = load_scenes("val", 4)
    paths = []
    for i, size in enumerate((40, 57)):
        path = tmp_path / f"scene{i}.png"
        Image.fromarray(scenes.images[i]).resize((size, size)).save(path)
        paths.append(path)
    results = predict_images(out / "adapter", paths, tmp_path / "pred", pretrained=False)
    for path, result in zip(paths, results):
        overlay = Image.open(result["overlay"])
        assert overlay.size[0] > 0 and Path(result["overlay"]).name == path.name
        assert sum(result["classes"].values()) == pytest.approx(1.0)
    cli = runner.invoke(app, ["predict", str(out / "adapter"), str(paths[0]), "--out", str(tmp_path / "cli"),
                              "--no-pretrained"])
    assert cli.exit_code == 0 and (tmp_path / "cli" / "scene0.png").exists(), cli.output


def test_predict_refuses_a_bad_image_naming_it(trained, tmp_path):
    out, _ = trained
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        predict_images(out / "adapter", [bad], tmp_path / "pred", pretrained=False)


def test_merged_segmentation_file_loads_with_the_printed_calls(tmp_path):
    run_training(_config(tmp_path / "run", method="lora"))
    adapter = tmp_path / "run" / "adapter"
    target = tmp_path / "merged.safetensors"
    snippet = merge_saved_adapter(adapter, target, None, False, False)
    namespace = {"deltavision": deltavision, "safetensors": __import__("safetensors.torch")}
    exec(snippet, namespace)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = deltavision.load_adapter(adapter, pretrained=False).eval()
    merged = namespace["model"].eval()
    assert (merged(images) - reference(images)).abs().max().item() <= 1e-4
    assert not any("lora" in k for k in load_file(str(target)))


def test_params_counts_the_segmentation_head():
    name, opts = TINY["convnext"]
    backbone_opts = [f"--backbone-opt={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in opts.items()]

    def counts(*extra):
        result = runner.invoke(app, ["params", "--backbone", name, "--method", "lora", "--num-classes", "5",
                                     *backbone_opts, "--json", *extra])
        assert result.exit_code == 0, result.output
        return __import__("json").loads(result.output)

    fpn, upernet = counts("--task", "segmentation", "--head", "fpn"), counts("--task", "segmentation")
    model = deltavision.create_model(name, "lora", 5, pretrained=False, backbone_options=opts, task="segmentation",
                                     head="fpn")
    assert fpn["trainable"] == deltavision.count_parameters(model)["trainable"] and fpn["task"] == "segmentation"
    assert upernet["trainable"] > fpn["trainable"] > counts()["trainable"]
