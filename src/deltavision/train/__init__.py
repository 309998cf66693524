"""Training, evaluation, checkpoints and run logs."""

from .loop import TrainConfig, TrainResult, evaluate, train
from .run import RunConfig, run_training

__all__ = ["RunConfig", "TrainConfig", "TrainResult", "evaluate", "run_training", "train"]
