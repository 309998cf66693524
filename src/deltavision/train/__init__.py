"""Training, evaluation, checkpoints and run logs.

:mod:`.loop` imports no timm (the MIST edge trainer uses it); :mod:`.run`
builds backbones. Both are loaded on first use.
"""

from ..lazy import lazy_attributes

_HOMES = {
    "TrainConfig": "loop",
    "TrainResult": "loop",
    "evaluate": "loop",
    "train": "loop",
    "RunConfig": "run",
    "resolve_run": "run",
    "run_training": "run",
}

__all__ = list(_HOMES)

__getattr__ = lazy_attributes(__name__, _HOMES)
