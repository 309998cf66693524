"""deltavision: adapt pretrained vision backbones cheaply.

SSF, Mona, E3VA, MIST and the parameter-efficient baselines on any timm backbone.
The model API is loaded on first use, so light parts (the MIST edge side) can be
imported without timm.
"""

from importlib import import_module

from .defaults import VERSION as __version__

_LAZY = {
    "DeltaVisionError": "errors",
    "list_methods": "methods",
    "adapt": "model",
    "count_parameters": "model",
    "create_model": "model",
    "load_adapter": "model",
    "merge": "model",
    "save_adapter": "model",
    "set_train_mode": "model",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
