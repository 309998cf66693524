"""The model API: building (:mod:`.build`), adapter files (:mod:`.state`), training modes (:mod:`.modes`)
and adapters on the Hugging Face Hub (:mod:`.hub`).

Loaded lazily: :mod:`.state` and :mod:`.modes` import no timm, so the MIST edge
side can use them; only :mod:`.build` (and rebuilding a model from an adapter)
needs timm.
"""

from ..lazy import lazy_attributes

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
    "resolve_adapter": "hub",
    "push_adapter": "hub",
}

__all__ = list(_HOMES)

__getattr__ = lazy_attributes(__name__, _HOMES)
