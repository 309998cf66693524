"""deltavision: adapt pretrained vision backbones cheaply.

SSF, Mona, E3VA, MIST and the parameter-efficient baselines on any timm backbone.
The model API is loaded on first use, so light parts (the MIST edge side) can be
imported without timm.
"""

from .defaults import VERSION as __version__
from .lazy import lazy_attributes

_LAZY = {
    "DeltaVisionError": "errors",
    "list_methods": "methods",
    "adapt": "model",
    "count_parameters": "model",
    "create_model": "model",
    "load_adapter": "model",
    "merge": "model",
    "push_adapter": "model",
    "export_adapter": "export",
    "save_adapter": "model",
    "set_train_mode": "model",
}

__all__ = [*_LAZY, "__version__"]

__getattr__ = lazy_attributes(__name__, _LAZY)
