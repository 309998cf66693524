"""The main job: fine-tune one backbone with every method and compare them.

Each method trains in a fresh process so that its peak memory is its own
(DESIGN.md, "Measuring"). Finished methods are kept in ``out_dir/<method>/``
and skipped when the comparison is run again, so a crash loses one method at most.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .defaults import EMBEDDED_BACKBONE, EMBEDDED_DATA
from .errors import DeltaVisionError, IncompatibleMethodError
from .io import atomic_write, load_json, save_json
from .methods import get_method, list_methods
from .model import method_misfit
from .train.loop import TrainConfig
from .train.run import RunConfig, resolve_run, run_training, settings_json
from .train.plots import plot_accuracy_vs_params

SUMMARY = "summary.json"
COLUMNS = (
    "method", "trainable", "trainable_pct", "seeds", "top1", "top1_std", "top5", "top5_std", "within_noise",
    "train_seconds", "peak_memory_mb", "val_images",
)
NOISE_SE = 2.0  # differences to the best method up to this many standard errors count as noise


@dataclass
class CompareConfig:
    backbone: str = EMBEDDED_BACKBONE
    data: str = EMBEDDED_DATA
    data_options: dict[str, Any] = field(default_factory=dict)  # see deltavision.data.build_datasets
    methods: tuple[str, ...] = ()
    out_dir: str = "runs/compare"
    image_size: int | None = 64
    train_limit: int | None = 1000
    val_limit: int | None = 500
    augment: bool = False  # a 3-epoch budget on small images learns faster without it
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    lr: dict[str, float] = field(default_factory=dict)  # per method; unset: the method's default_lr
    pretrained: bool = True
    checkpoint: str | None = None
    overwrite: bool = False
    seeds: int = 1
    nproc: int = 1  # processes per method (torchrun, data-parallel)
    backbone_options: dict[str, Any] = field(default_factory=dict)


def _train_in_this_process(config: RunConfig) -> dict[str, Any]:
    return run_training(config)


def run_one_isolated(config: RunConfig, nproc: int = 1) -> dict[str, Any]:
    """run_training in a fresh spawned process, so peak memory is this run's alone; with ``nproc`` > 1,
    data-parallel in that many processes launched by torchrun (the main process's summary is returned)."""
    if nproc > 1:
        return _run_under_torchrun(config, nproc)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_train_in_this_process, config).result()


def _run_under_torchrun(config: RunConfig, nproc: int) -> dict[str, Any]:
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings, summary = out / "compare-settings.json", out / "compare-summary.json"
    save_json(settings_json(config), settings)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "deltavision.train.worker", str(settings), str(summary)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise DeltaVisionError(f"{config.method} failed under torchrun: {result.stderr.strip().splitlines()[-1:]}")
    return load_json(summary)


def compare(config: CompareConfig, on_result=None, on_skip=None, on_start=None) -> list[dict[str, Any]]:
    """Train every method (or ``config.methods``) with ``config.seeds`` seeds and write the reports;
    return one row per method (means and spreads over the seeds, see :func:`summarise`).

    Without an explicit method list, methods that do not fit the backbone's family
    (VPT on a CNN, say) are skipped and passed to ``on_skip(method, reason)``. Before each
    run ``on_start(number, total, method, seed, cached)`` is called; ``cached`` runs were
    finished earlier with the same settings and are not retrained.
    """
    methods = _fitting_methods(config, on_skip)
    seeds = [config.train.seed + i for i in range(config.seeds)]
    total, number, rows = len(methods) * len(seeds), 0, []
    for name in methods:
        runs = []
        for seed in seeds:
            number += 1
            run_config = _run_config(config, name, seed)
            row = None if config.overwrite else finished_run(Path(run_config.out_dir), run_config)
            if on_start:
                on_start(number, total, name, seed, row is not None)
            runs.append({**row, "cached": True} if row else train_and_keep(run_config, config.nproc))
        rows.append(summarise(name, runs))
        if on_result:
            on_result(rows[-1])
    mark_noise(rows)
    write_reports(rows, Path(config.out_dir), config)
    return rows


def _fitting_methods(config: CompareConfig, on_skip) -> list[str]:
    methods = config.methods or tuple(list_methods())
    for name in methods:
        get_method(name)  # fail on a typo before hours of training
    fitting = []
    for name in methods:
        reason = method_misfit(config.backbone, name, config.backbone_options)
        if reason and config.methods:
            raise IncompatibleMethodError(reason)
        if reason and on_skip:
            on_skip(name, reason)
        if not reason:
            fitting.append(name)
    return fitting


def train_and_keep(run_config: RunConfig, nproc: int = 1) -> dict[str, Any]:
    """Train ``run_config`` in a fresh process (:func:`run_one_isolated`) and keep its summary in its run folder."""
    row = run_one_isolated(run_config, nproc)
    row["trainable_pct"] = 100.0 * row["trainable"] / row["total"]
    save_json(row, Path(run_config.out_dir) / SUMMARY)
    return {**row, "cached": False}


def summarise(method: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's row: top-1/top-5 mean and standard deviation over its seeds (0 for one seed),
    mean training time, largest peak memory, validation images, and whether every run was cached."""
    top1, top5 = [r["top1"] for r in runs], [r["top5"] for r in runs]
    first = runs[0]
    return {
        "method": method, "trainable": first["trainable"], "total": first["total"],
        "trainable_pct": first["trainable_pct"], "seeds": len(runs),
        "top1": statistics.fmean(top1), "top1_std": _std(top1),
        "top5": statistics.fmean(top5), "top5_std": _std(top5),
        "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in runs),
        "val_images": first.get("val_images") or first["config"]["val_limit"],
        "cached": all(r.get("cached") for r in runs),
    }


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def standard_error(row: dict[str, Any]) -> float:
    """Standard error of a method's mean top-1, in points: binomial over its validation images
    plus the spread over its seeds, combined as sqrt(p(1-p)/n + s^2/N)."""
    p = row["top1"] / 100.0
    binomial = p * (1 - p) / row["val_images"]
    return 100.0 * math.sqrt(binomial + (row["top1_std"] / 100.0) ** 2 / row["seeds"])


def mark_noise(rows: list[dict[str, Any]]) -> None:
    """Set ``within_noise`` on each row: its top-1 is within NOISE_SE standard errors of the best
    method's (the standard errors of both combined); the best method itself is within noise."""
    if not rows:
        return
    best = max(rows, key=lambda r: r["top1"])
    for row in rows:
        gap = best["top1"] - row["top1"]
        row["within_noise"] = gap <= NOISE_SE * math.hypot(standard_error(row), standard_error(best))


def _run_config(config: CompareConfig, method: str, seed: int) -> RunConfig:
    """The run of ``method`` with ``seed``: in ``out_dir/<method>`` for the first seed, ``<method>.seed<N>`` for others."""
    folder = method if seed == config.train.seed else f"{method}.seed{seed}"
    train = replace(
        config.train, lr=config.lr.get(method), progress=config.train.progress, seed=seed
    )
    return RunConfig(
        backbone=config.backbone,
        method=method,
        data=config.data,
        data_options=dict(config.data_options),
        out_dir=str(Path(config.out_dir) / folder),
        options=config.method_options.get(method, {}),
        image_size=config.image_size,
        train_limit=config.train_limit,
        val_limit=config.val_limit,
        augment=config.augment,
        pretrained=config.pretrained,
        checkpoint=config.checkpoint,
        backbone_options=dict(config.backbone_options),
        overwrite=True,
        train=train,
    )


def finished_run(run_dir: Path, run_config: RunConfig) -> dict[str, Any] | None:
    """The summary of an earlier run with exactly these settings, if there is one."""
    try:
        row = load_json(run_dir / SUMMARY)
    except DeltaVisionError:
        return None
    same = row.get("config") == settings_json(resolve_run(run_config))
    return row if same else None


def write_reports(rows: list[dict[str, Any]], out_dir: Path, config: CompareConfig) -> None:
    """compare.csv, compare.md and accuracy_vs_params.png in ``out_dir``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out_dir / "compare.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    atomic_write(out_dir / "compare.md", lambda tmp: Path(tmp).write_text(markdown_table(rows)))
    title = f"{config.backbone} on {config.data}"
    plot_accuracy_vs_params(rows, out_dir / "accuracy_vs_params.png", title)
    save_json({"config": json.loads(json.dumps(config, default=lambda o: o.__dict__))}, out_dir / "settings.json")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as Markdown, with a footer stating the noise rule."""
    head = (
        "| method | trainable params | trainable % | top-1 % | top-5 % | within noise of best | train time s "
        "| peak memory growth MB |\n|---|---:|---:|---:|---:|:-:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.2f} | {mean_spread(r, 'top1')} "
        f"| {mean_spread(r, 'top5')} | {'yes' if r.get('within_noise') else 'no'} | {r['train_seconds']:.1f} "
        f"| {r['peak_memory_mb']:.0f} |\n"
        for r in rows
    )
    return head + body + "\n" + noise_footer(rows) + "\n"


def mean_spread(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f} ± {row[key + '_std']:.2f}" if row.get("seeds", 1) > 1 else f"{row[key]:.2f}"


def noise_footer(rows: list[dict[str, Any]]) -> str:
    """How the table was measured and how "within noise" is decided."""
    seeds = rows[0].get("seeds", 1) if rows else 1
    images = rows[0].get("val_images") if rows else None
    spread = f"mean ± standard deviation over {seeds} seeds; " if seeds > 1 else "one seed; "
    return (
        f"Top-1 and top-5 on {images} validation images, {spread}"
        f"a method is within noise of the best when the best top-1 exceeds its own by at most "
        f"{NOISE_SE:g} standard errors of the difference, each method's standard error being "
        "sqrt(p(1-p)/n + s²/N) (p: its top-1, n: validation images, s: its top-1 spread over N seeds; "
        "s = 0 for one seed, where only the binomial error of the validation sample counts)."
    )
