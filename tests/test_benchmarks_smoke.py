"""The CPU path of benchmarks/gpu.sh runs end to end (behaviour only: files, rows, target lines; never timing)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "mona", "ssf", "e3va")
BACKBONES = ("swin_base_patch4_window7_224", "vit_base_patch16_224")


@pytest.mark.slow
def test_gpu_sh_cpu_quick_path_writes_table_and_targets(tmp_path):
    src = str(ROOT / "src")
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "gpu-quick"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "gpu.md").read_text()
    assert (out / "gpu.png").stat().st_size > 0 and (out / "gpu.csv").exists()
    for backbone in BACKBONES:
        for method in METHODS:
            row = re.search(rf"^\| {backbone} \| {method} \| ([^|]+) \|", table, re.MULTILINE)
            assert row and row.group(1).strip()[0].isdigit(), f"no measured row for {backbone} {method}"
        assert re.search(rf"^\| {backbone} \| \d", table, re.MULTILINE), f"no inference row for {backbone}"
        targets = re.findall(rf"^(PASS|MISS): {backbone} e3va-r8 ", table, re.MULTILINE)
        assert len(targets) == 3, table
    assert "Device cpu" in table


def test_gpu_sh_refuses_fp16_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--precision", "fp16",
                           "--quick", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0 and "fp16 needs a GPU" in done.stderr
    assert not (tmp_path / "gpu.md").exists()


SEGMENTATION_COST_METHODS = ("full", "linear", "lora", "mona", "ssf", "e3va")
SEGMENTATION_BACKBONES = ("swin_tiny_patch4_window7_224", "vit_small_patch16_224")


@pytest.mark.slow
def test_segmentation_benchmark_quick_writes_cost_targets_and_accuracy_table(tmp_path):
    """benchmarks/segmentation.py --quick: a measured UPerNet row per backbone and method, three E3VA
    target lines per backbone, and an accuracy row (mIoU, pixel accuracy) for e3va (never the values)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "seg-quick"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "segmentation.py"), "--quick", "--threads", "1",
                           "--out", str(out), "--runs", str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    cost = (out / "segmentation_cost.md").read_text()
    for backbone in SEGMENTATION_BACKBONES:
        for method in SEGMENTATION_COST_METHODS:
            row = re.search(rf"^\| {backbone} \| {method} \| ([^|]+) \| ([^|]+) \|", cost, re.MULTILINE)
            assert row and row.group(1).strip()[0].isdigit() and row.group(2).strip()[0].isdigit(), \
                f"no measured row for {backbone} {method}"
        assert len(re.findall(rf"^(PASS|MISS): {backbone} e3va-r8 ", cost, re.MULTILINE)) == 3, cost
    accuracy = (out / "segmentation.md").read_text()
    for method in ("e3va",):
        row = re.search(rf"^\| {method} \| 0 \| [\d,]+ \| [\d.]+ \| [\de.-]+ \| ([\d.]+) \| ([\d.]+) \|", accuracy,
                        re.MULTILINE)
        assert row, f"no accuracy row for {method}:\n{accuracy}"
        assert 0 <= float(row.group(1)) <= 100 and 0 <= float(row.group(2)) <= 100
    for name in ("segmentation_cost.png", "segmentation.png", "segmentation.csv", "segmentation_cost.csv"):
        assert (out / name).stat().st_size > 0


def _segmentation_benchmark():
    """benchmarks/segmentation.py as a module (benchmarks/ is not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import segmentation
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return segmentation


def test_segmentation_targets_compare_e3va_with_full_and_lora_of_the_same_backbone():
    bench = _segmentation_benchmark()
    rows = [{"backbone": backbone, "method": method, "status": "ok", "peak_growth_mib": memory, "step_s": step}
            for backbone, method, memory, step in (
                ("a", "full", 1000.0, 10.0), ("a", "lora", 500.0, 8.0), ("a", "e3va", 250.0, 5.0),
                ("b", "full", 100.0, 1.0), ("b", "lora", 1000.0, 1.0), ("b", "e3va", 40.0, 0.7))]
    lines = bench.target_lines(bench.add_ratios(rows))
    assert lines == [
        "PASS: a e3va-r8 peak memory 0.25x full fine-tuning (target <= 0.35)",
        "PASS: a e3va-r8 peak memory 0.50x LoRA (target <= 0.6)",
        "PASS: a e3va-r8 step time 0.50x full fine-tuning (target <= 0.6)",
        "MISS: b e3va-r8 peak memory 0.40x full fine-tuning (target <= 0.35)",
        "PASS: b e3va-r8 peak memory 0.04x LoRA (target <= 0.6)",
        "MISS: b e3va-r8 step time 0.70x full fine-tuning (target <= 0.6)",
        "4 of 6 target checks pass.",
    ]


def test_dense_fixed_batch_has_one_label_per_pixel():
    bench = _segmentation_benchmark()
    images, masks = bench.fixed_batch(2, 16, dense=True)
    assert images.shape == (2, 3, 16, 16) and masks.shape == (2, 16, 16)
    assert masks.dtype.is_floating_point is False and 0 <= masks.min() and masks.max() < bench.common.NUM_CLASSES


@pytest.mark.slow
def test_detection_benchmark_quick_writes_cost_targets_and_ap_table(tmp_path):
    """benchmarks/detection.py --quick: a measured Mask R-CNN row for full, LoRA and E3VA, three E3VA target
    lines, and an AP row for e3va trained on fashion-scenes (never the values)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "det-quick"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "detection.py"), "--quick", "--out", str(out),
                           "--runs", str(tmp_path / "runs")], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    cost = (out / "detection.md").read_text()
    for method in ("full", "lora", "e3va-r8"):
        row = re.search(rf"^\| {method} \| ([\d,]+) \| ([\d.]+) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", cost, re.MULTILINE)
        assert row, f"no measured row for {method}:\n{cost}"
    assert len(re.findall(r"^(PASS|MISS)  e3va-r8 Mask R-CNN ", cost, re.MULTILINE)) == 3, cost
    accuracy = (out / "detection_accuracy.md").read_text()
    row = re.search(r"^\| e3va \| [\d,]+ \| [\d.e-]+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|",
                    accuracy, re.MULTILINE)
    assert row, f"no AP row for e3va:\n{accuracy}"
    assert all(0 <= float(value) <= 100 for value in row.groups())
    for name in ("detection.png", "detection.csv", "detection_accuracy.png", "detection_accuracy.csv"):
        assert (out / name).stat().st_size > 0


def _detection_benchmark():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import detection
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return detection


def test_detection_targets_compare_e3va_with_full_and_lora():
    bench = _detection_benchmark()
    rows = [{"backbone": bench.SWIN, "method": method, "status": "ok", "peak_growth_mib": memory, "step_s": step}
            for method, memory, step in (("full", 1000.0, 10.0), ("lora", 600.0, 9.0), ("e3va-r8", 400.0, 8.5))]
    assert bench.target_lines(bench.add_ratios(rows)) == [
        f"PASS  e3va-r8 Mask R-CNN {bench.SWIN}: peak memory 0.40x full fine-tuning (target <= 0.45)",
        f"MISS  e3va-r8 Mask R-CNN {bench.SWIN}: peak memory 0.67x LoRA (target <= 0.64)",
        f"MISS  e3va-r8 Mask R-CNN {bench.SWIN}: step time 0.85x full fine-tuning (target <= 0.8)",
        "1 of 3 target checks pass.",
    ]
