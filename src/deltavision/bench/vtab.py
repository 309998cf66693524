"""``deltavision bench vtab``: the VTAB-1k benchmark with the papers' protocol.

For every task and method, train on ``train800val200`` and report top-1 on ``test`` after the last
epoch (the ``final`` protocol); the ``tune`` protocol trains on ``train800`` and scores ``val200``,
for choosing hyper-parameters. Each task runs through :func:`deltavision.compare.compare` in
``out_dir/<task>/`` (``out_dir/tune/<task>/`` for tuning): every method trains in a fresh
process and keeps its ``summary.json``, so a re-run skips finished (task, method) pairs that
have the same settings, and ``overwrite`` retrains them. The results go to one table beside the
published numbers (:mod:`deltavision.bench.report`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..compare import CompareConfig, compare
from ..data.vtab import PROTOCOLS, TASKS
from ..errors import DataError
from ..train.loop import TrainConfig
from .report import VtabResult, write_vtab_reports

DEFAULT_BACKBONE = "vit_base_patch16_224.orig_in21k"


def default_train_config() -> TrainConfig:
    """100 epochs with 10 of warm-up and batch 32: the usual VTAB-1k budget (learning rates are per method)."""
    return TrainConfig(epochs=100, batch_size=32, warmup_epochs=10)


@dataclass
class VtabConfig:
    root: str
    backbone: str = DEFAULT_BACKBONE
    methods: tuple[str, ...] = ("ssf",)
    tasks: tuple[str, ...] = ()  # empty: all 19, in the papers' order
    out_dir: str = "runs/vtab"
    protocol: str = "final"  # final: train800val200 -> test; tune: train800 -> val200
    image_size: int | None = None  # None: the backbone's (224 for ViT-B/16), a plain resize as in VTAB
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    lr: dict[str, float] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=default_train_config)
    pretrained: bool = True
    checkpoint: str | None = None
    backbone_options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    nproc: int = 1


def chosen_tasks(config: VtabConfig) -> tuple[str, ...]:
    """The tasks to run in the papers' order; DataError for an unknown name or a missing task folder."""
    if config.protocol not in PROTOCOLS:
        raise DataError(f"Unknown VTAB-1k protocol {config.protocol!r}; use one of {', '.join(PROTOCOLS)}.")
    unknown = [task for task in config.tasks if task not in TASKS]
    if unknown:
        raise DataError(f"Unknown VTAB-1k task(s) {', '.join(unknown)}; the tasks are {', '.join(TASKS)}.")
    tasks = tuple(task for task in TASKS if not config.tasks or task in config.tasks)
    root = Path(config.root).expanduser()
    lists = PROTOCOLS[config.protocol]
    missing = [task for task in tasks if not all((root / task / name).is_file() for name in lists)]
    if missing:
        raise DataError(
            f"VTAB-1k task folder(s) missing under {root} (each needs {' and '.join(lists)}): {', '.join(missing)}; "
            "add them, or choose the present ones with --tasks."
        )
    return tasks


def task_source(config: VtabConfig, task: str) -> str:
    """The ``--data`` source of one task under the configured protocol."""
    source = f"vtab:{Path(config.root).expanduser() / task}"
    return source if config.protocol == "final" else f"{source}:{config.protocol}"


def task_out_dir(config: VtabConfig, task: str) -> Path:
    """Where one task's runs and its per-task comparison go."""
    base = Path(config.out_dir)
    return base / task if config.protocol == "final" else base / config.protocol / task


def _compare_config(config: VtabConfig, task: str) -> CompareConfig:
    """One task as a comparison of the methods: no sample limits, no augmentation (VTAB resizes only)."""
    return CompareConfig(
        backbone=config.backbone, data=task_source(config, task), methods=tuple(config.methods),
        out_dir=str(task_out_dir(config, task)), image_size=config.image_size, train_limit=None, val_limit=None,
        augment=False, method_options=config.method_options, train=config.train, lr=config.lr,
        pretrained=config.pretrained, checkpoint=config.checkpoint, overwrite=config.overwrite, seeds=1,
        nproc=config.nproc, backbone_options=config.backbone_options,
    )


StartHook = Callable[[int, int, str, str, bool], None]


def run_vtab(config: VtabConfig, on_start: StartHook | None = None) -> list[VtabResult]:
    """Run every (task, method) pair not finished before; write vtab.md, vtab.csv and vtab.png; return the results.

    ``on_start(number, total, task, method, cached)`` is called before each pair.
    """
    if not config.methods:
        raise DataError("Name at least one method to benchmark (--method ssf).")
    tasks = chosen_tasks(config)
    total, done, results = len(tasks) * len(config.methods), 0, []
    for task in tasks:
        offset = done

        def announce(number, _total, method, _seed, cached, task=task, offset=offset):
            if on_start:
                on_start(offset + number, total, task, method, cached)

        rows = compare(_compare_config(config, task), on_start=announce)
        done += len(rows)
        results += [VtabResult(task, row["method"], row["top1"], row["trainable"], row["cached"]) for row in rows]
    write_vtab_reports(results, config)
    return results
