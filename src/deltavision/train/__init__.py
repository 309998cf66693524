"""Training, evaluation, checkpoints and run logs.

:mod:`.loop` imports no timm (the MIST edge trainer uses it); :mod:`.run`
builds backbones. Both are loaded on first use.
"""

from importlib import import_module

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


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
