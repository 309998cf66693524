"""`deltavision compare`: progress lines, cached runs, seeds, spreads and the noise rule.

Training is replaced by a stand-in that returns made-up accuracies at once (each real run is
covered by test_train.py); what is tested is the bookkeeping around it.
"""

import math

import pytest
from typer.testing import CliRunner

from deltavision import compare as compare_module
from deltavision.cli import app
from deltavision.compare import CompareConfig, compare, mark_noise, markdown_table, standard_error

from deltavision.train.run import resolve_run, settings_json

from conftest import TINY

VIT, _ = TINY["vit"]
TOP1 = {("linear", 0): 80.0, ("linear", 1): 82.0, ("bitfit", 0): 86.0, ("bitfit", 1): 87.0}


@pytest.fixture
def fake_training(monkeypatch):
    """Replace the isolated training run; return the list of (method, seed) runs actually trained."""
    trained = []

    def run(config, nproc=1):
        key = (config.method, config.train.seed)
        trained.append(key)
        return {
            "method": config.method, "trainable": 100, "total": 1000, "top1": TOP1[key], "top5": 99.0,
            "train_seconds": 5.0, "peak_memory_mb": 10.0, "val_images": 500,
            "config": settings_json(resolve_run(config)),  # run_training reports its resolved settings
        }

    monkeypatch.setattr(compare_module, "run_one_isolated", run)
    monkeypatch.setattr(compare_module, "write_reports", lambda rows, out, config: None)
    return trained


def test_second_run_uses_the_cached_results_and_says_so(tmp_path, fake_training):
    config = CompareConfig(backbone=VIT, methods=("linear", "bitfit"), out_dir=str(tmp_path))
    starts = []
    first = compare(config, on_start=lambda *args: starts.append(args))
    assert starts == [(1, 2, "linear", 0, False), (2, 2, "bitfit", 0, False)]
    assert [r["cached"] for r in first] == [False, False]
    starts.clear()
    second = compare(config, on_start=lambda *args: starts.append(args))
    assert starts == [(1, 2, "linear", 0, True), (2, 2, "bitfit", 0, True)]
    assert [r["cached"] for r in second] == [True, True]
    assert fake_training == [("linear", 0), ("bitfit", 0)]


def test_seeds_give_mean_and_spread_per_method(tmp_path, fake_training):
    config = CompareConfig(backbone=VIT, methods=("linear", "bitfit"), out_dir=str(tmp_path), seeds=2)
    rows = {r["method"]: r for r in compare(config)}
    assert fake_training == [("linear", 0), ("linear", 1), ("bitfit", 0), ("bitfit", 1)]
    assert rows["linear"]["top1"] == pytest.approx(81.0)
    assert rows["linear"]["top1_std"] == pytest.approx(math.sqrt(2.0))
    assert rows["bitfit"]["top1_std"] == pytest.approx(math.sqrt(0.5))
    assert (tmp_path / "linear.seed1" / "summary.json").is_file()


def _row(method, top1, std=0.0, seeds=1, images=500):
    return {"method": method, "top1": top1, "top1_std": std, "seeds": seeds, "val_images": images}


def test_standard_error_combines_the_binomial_and_the_seed_spread():
    assert standard_error(_row("a", 85.0)) == pytest.approx(100 * math.sqrt(0.85 * 0.15 / 500))  # ~1.6 points
    assert standard_error(_row("a", 85.0, std=2.0, seeds=4)) == pytest.approx(
        100 * math.sqrt(0.85 * 0.15 / 500 + 0.02**2 / 4)
    )


def test_differences_within_two_standard_errors_are_marked_as_noise():
    rows = [_row("best", 87.2), _row("close", 85.0), _row("far", 78.6)]
    mark_noise(rows)
    assert [r["within_noise"] for r in rows] == [True, True, False]
    text = markdown_table([{**r, "trainable": 1, "trainable_pct": 1.0, "top5": 99.0, "top5_std": 0.0,
                            "train_seconds": 1.0, "peak_memory_mb": 1.0} for r in rows])
    assert "within noise" in text and "sqrt(p(1-p)/n + s²/N)" in text and "2 standard errors" in text


def test_cli_compare_numbers_each_run_and_marks_cached_results(tmp_path, fake_training):
    args = ["compare", "--backbone", VIT, "--method", "linear", "--method", "bitfit", "--out", str(tmp_path)]
    first = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    assert "[1/2] linear (seed 0): training ..." in first.output
    assert "[2/2] bitfit (seed 0): training ..." in first.output
    assert "cached" not in first.output
    second = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert "[1/2] linear (seed 0): cached from an earlier run" in second.output
    assert "linear: top-1 80.00%, 5s of training (cached from an earlier run)" in second.output
