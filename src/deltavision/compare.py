"""The main job: fine-tune one backbone with every method and compare them.

Each method trains in a fresh process so that its peak memory is its own
(DESIGN.md, "Measuring"). Finished methods are kept in ``out_dir/<method>/``
and skipped when the comparison is run again, so a crash loses one method at most.
"""

from __future__ import annotations

import csv
import io
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
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
COLUMNS = ("method", "trainable", "trainable_pct", "top1", "top5", "train_seconds", "peak_memory_mb")


@dataclass
class CompareConfig:
    backbone: str = EMBEDDED_BACKBONE
    data: str = EMBEDDED_DATA
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


def _train_in_this_process(config: RunConfig) -> dict[str, Any]:
    return run_training(config)


def run_one_isolated(config: RunConfig) -> dict[str, Any]:
    """run_training in a fresh spawned process, so peak memory is this run's alone."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_train_in_this_process, config).result()


def compare(config: CompareConfig, on_result=None, on_skip=None) -> list[dict[str, Any]]:
    """Train every method (or ``config.methods``) and write the reports; return one row per method.

    Without an explicit method list, methods that do not fit the backbone's family
    (VPT on a CNN, say) are skipped and passed to ``on_skip(method, reason)``.
    """
    methods = config.methods or tuple(list_methods())
    for name in methods:
        get_method(name)  # fail on a typo before hours of training
    rows = []
    for name in methods:
        reason = method_misfit(config.backbone, name)
        if reason and config.methods:
            raise IncompatibleMethodError(reason)
        if reason:
            if on_skip:
                on_skip(name, reason)
            continue
        run_dir = Path(config.out_dir) / name
        run_config = _run_config(config, name, run_dir)
        row = None if config.overwrite else _finished(run_dir, run_config)
        if row is None:
            row = run_one_isolated(run_config)
            row["trainable_pct"] = 100.0 * row["trainable"] / row["total"]
            save_json(row, run_dir / SUMMARY)
        rows.append(row)
        if on_result:
            on_result(row)
    write_reports(rows, Path(config.out_dir), config)
    return rows


def _run_config(config: CompareConfig, method: str, run_dir: Path) -> RunConfig:
    train = replace(config.train, lr=config.lr.get(method), progress=config.train.progress)
    return RunConfig(
        backbone=config.backbone,
        method=method,
        data=config.data,
        out_dir=str(run_dir),
        options=config.method_options.get(method, {}),
        image_size=config.image_size,
        train_limit=config.train_limit,
        val_limit=config.val_limit,
        augment=config.augment,
        pretrained=config.pretrained,
        checkpoint=config.checkpoint,
        overwrite=True,
        train=train,
    )


def _finished(run_dir: Path, run_config: RunConfig) -> dict[str, Any] | None:
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
    head = "| method | trainable params | trainable % | top-1 % | top-5 % | train time s | peak memory MB |\n"
    head += "|---|---:|---:|---:|---:|---:|---:|\n"
    body = "".join(
        f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.2f} | {r['top1']:.2f} | {r['top5']:.2f} "
        f"| {r['train_seconds']:.1f} | {r['peak_memory_mb']:.0f} |\n"
        for r in rows
    )
    return head + body
