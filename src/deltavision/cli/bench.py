"""``deltavision bench``: benchmarks with the papers' protocols."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import (
    BACKBONE_HELP,
    BACKBONE_OPT_HELP,
    CHECKPOINT_HELP,
    DEVICE_HELP,
    PRECISION_HELP,
    _backbone_options,
    console,
)

bench_app = typer.Typer(help="Benchmarks with the papers' protocols (VTAB-1k).", no_args_is_help=True)

METHOD_OPT_HELP = "Method option as METHOD.key=value (repeatable), e.g. --opt vpt.deep=true."


def method_options(pairs: Optional[List[str]]) -> dict[str, dict[str, str]]:
    """``["vpt.deep=true", ...]`` -> ``{"vpt": {"deep": "true"}}``."""
    from ..errors import MethodOptionError
    from ..options import parse_pairs

    options: dict[str, dict[str, str]] = {}
    for key, value in parse_pairs(pairs).items():
        method, dot, name = key.partition(".")
        if not dot or not method or not name:
            raise MethodOptionError(f"option {key}={value} should look like METHOD.key=value, e.g. vpt.deep=true")
        options.setdefault(method, {})[name] = value
    return options


def task_names(tasks: Optional[List[str]]) -> tuple[str, ...]:
    """``--tasks`` values, repeated or comma-separated."""
    return tuple(name.strip() for entry in tasks or () for name in entry.split(",") if name.strip())


@bench_app.command("vtab")
def vtab(
    root: Path = typer.Option(..., help="The VTAB-1k folder: one folder per task (NOAH's names: cifar, caltech101, ...)."),
    backbone: str = typer.Option("vit_base_patch16_224.orig_in21k", help=BACKBONE_HELP),
    method: Optional[List[str]] = typer.Option(None, help="Method to benchmark (repeatable) [default: ssf]."),
    tasks: Optional[List[str]] = typer.Option(None, help="Tasks to run (repeatable or comma-separated) [default: all 19]."),
    out: Path = typer.Option(Path("runs/vtab"), help="Folder for the runs, vtab.md, vtab.csv and vtab.png."),
    protocol: str = typer.Option("final", help="final: train on train800val200, score test; tune: train800 -> val200."),
    opt: Optional[List[str]] = typer.Option(None, help=METHOD_OPT_HELP),
    backbone_opt: Optional[List[str]] = typer.Option(None, help=BACKBONE_OPT_HELP),
    epochs: int = typer.Option(100, min=1),
    batch_size: int = typer.Option(32, min=1),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate for every method [default: each method's]."),
    weight_decay: float = typer.Option(0.05, min=0.0),
    warmup_epochs: float = typer.Option(10.0, min=0.0),
    image_size: Optional[int] = typer.Option(None, min=8, help="Input size [default: the backbone's]."),
    checkpoint: Optional[Path] = typer.Option(None, help=CHECKPOINT_HELP),
    pretrained: bool = typer.Option(True, help="Start from pretrained weights (hub or --checkpoint)."),
    overwrite: bool = typer.Option(False, help="Retrain (task, method) pairs already finished in --out."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    nproc: int = typer.Option(1, min=1, help="Processes per run: each trains data-parallel under torchrun."),
) -> None:
    """VTAB-1k with the papers' protocol: per task and method, train on train800val200 and report test top-1.

    Finished (task, method) pairs keep their summary.json and are skipped when run again with the same
    settings. Writes a table with the published numbers side by side (vtab.md, vtab.csv) and a plot.
    """
    from ..bench.vtab import VtabConfig, run_vtab
    from ..train.loop import TrainConfig

    methods = tuple(method or ("ssf",))
    config = VtabConfig(
        root=str(root), backbone=backbone, methods=methods, tasks=task_names(tasks), out_dir=str(out),
        protocol=protocol, image_size=image_size, method_options=method_options(opt),
        lr={name: lr for name in methods} if lr is not None else {}, pretrained=pretrained,
        checkpoint=str(checkpoint) if checkpoint else None, backbone_options=_backbone_options(backbone_opt),
        overwrite=overwrite, nproc=nproc,
        train=TrainConfig(epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                          seed=seed, device=device, precision=precision),
    )

    def announce(number: int, total: int, task: str, name: str, cached: bool) -> None:
        what = "cached from an earlier run" if cached else "training ..."
        console.print(f"[{number}/{total}] {task} / {name}: {what}", markup=False, highlight=False)

    results = run_vtab(config, on_start=announce)
    stem = "vtab" if protocol == "final" else f"vtab-{protocol}"
    for result in results:
        console.print(f"  {result.task} / {result.method}: top-1 {result.top1:.2f}%", markup=False, highlight=False)
    console.print(f"table: {out / (stem + '.md')}, {out / (stem + '.csv')}; plot: {out / (stem + '.png')}",
                  markup=False, highlight=False)
