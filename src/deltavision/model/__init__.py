"""The model API: building (:mod:`.build`), adapter files (:mod:`.state`) and training modes (:mod:`.modes`).

Loaded lazily: :mod:`.state` and :mod:`.modes` import no timm, so the MIST edge
side can use them; only :mod:`.build` (and rebuilding a model from an adapter)
needs timm.
"""

from importlib import import_module

_HOMES = {
    "create_model": "build",
    "adapt": "build",
    "merge": "build",
    "method_misfit": "build",
    "ModelSpec": "state",
    "spec_of": "state",
    "count_parameters": "state",
    "adapter_state_dict": "state",
    "save_adapter": "state",
    "load_adapter": "state",
    "load_adapter_tensors": "state",
    "read_adapter_config": "state",
    "set_train_mode": "modes",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
