"""Where a run's per-epoch rows go besides log.csv: TensorBoard event files or Weights & Biases.

``log.csv`` is always written (by the loop). ``logger="auto"`` adds TensorBoard
event files in the run folder when the ``tensorboard`` package is installed;
``"tensorboard"`` asks for them (and fails clearly without the package),
``"wandb"`` logs to Weights & Biases (imported only then), ``"csv"`` adds
nothing. Each row is logged at step = its epoch: the learning rate, the
training loss, the objective's metrics (``val/<name>``), peak memory and
throughput. Only the main process logs.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from ..errors import DeltaVisionError

LOGGERS = ("auto", "tensorboard", "csv", "wandb")
SYSTEM = {"process_peak_memory_mb", "images_per_s"}


class LoggerUnavailableError(DeltaVisionError):
    """The logger asked for needs a package that is not installed, or is unknown."""


def resolve_logger(name: str) -> str:
    """``name`` with "auto" settled: tensorboard when installed, else csv. Refuses unknown names."""
    if name not in LOGGERS:
        raise LoggerUnavailableError(f"--logger {name!r} is not one of {', '.join(LOGGERS)}")
    if name == "auto":
        return "tensorboard" if _installed("tensorboard") else "csv"
    if name in ("tensorboard", "wandb") and not _installed(name):
        raise LoggerUnavailableError(f"--logger {name} needs the {name} package: pip install 'deltavision[{name}]'")
    return name


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def scalar_name(key: str) -> str:
    """The chart a history column goes to: train/loss, train/lr, val/<metric>, system/<measure>."""
    if key == "train_loss":
        return "train/loss"
    if key == "lr":
        return "train/lr"
    if key in SYSTEM:
        return f"system/{key}"
    return "val/" + key.removeprefix("val_")


def scalars(row: dict) -> dict[str, float]:
    """The row's numbers by chart name (the epoch is the step, not a scalar)."""
    return {scalar_name(k): float(v) for k, v in row.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    """Event files in ``out_dir`` (``tensorboard --logdir`` on it or any folder above it)."""

    def __init__(self, out_dir: Path, first_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run discards what an interrupted one logged for the epochs it redoes.
        self.writer = SummaryWriter(log_dir=str(out_dir), purge_step=first_epoch if first_epoch > 1 else None)

    def log(self, row: dict) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, global_step=row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """One W&B run per run folder (its id kept in ``wandb_id``, so a resumed run continues it).

    The project is ``$WANDB_PROJECT`` or "deltavision"; W&B's own settings
    (``WANDB_MODE=offline``, the API key) apply.
    """

    ID_FILE = "wandb_id"

    def __init__(self, out_dir: Path, settings: dict):
        import wandb

        id_file = out_dir / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "deltavision"), name=out_dir.name, id=run_id, resume="allow",
            dir=str(out_dir), config=settings,
        )

    def log(self, row: dict) -> None:
        values = {k: v for k, v in scalars(row).items() if not math.isnan(v)}
        self.run.log({**values, "epoch": row["epoch"]}, step=row["epoch"])

    def close(self) -> None:
        self.run.finish()


class NoLogger:
    """csv only: log.csv is written by the loop."""

    def log(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_logger(name: str, out_dir: Path, first_epoch: int = 1, settings: dict | None = None):
    """The logger ``name`` (see :func:`resolve_logger`) writing into ``out_dir``; the first epoch to log
    is ``first_epoch`` (a resumed run's)."""
    kind = resolve_logger(name)
    if kind == "tensorboard":
        return TensorBoardLogger(Path(out_dir), first_epoch)
    if kind == "wandb":
        return WandbLogger(Path(out_dir), settings or {})
    return NoLogger()
