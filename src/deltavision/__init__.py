"""deltavision: adapt pretrained vision backbones cheaply.

SSF, Mona, E3VA, MIST and the parameter-efficient baselines on any timm backbone.
"""

__version__ = "0.1.0"

from .errors import DeltaVisionError  # noqa: E402
from .methods import list_methods  # noqa: E402
from .model import (  # noqa: E402
    count_parameters,
    create_model,
    load_adapter,
    merge,
    save_adapter,
    set_train_mode,
)

__all__ = [
    "DeltaVisionError",
    "count_parameters",
    "create_model",
    "list_methods",
    "load_adapter",
    "merge",
    "save_adapter",
    "set_train_mode",
    "__version__",
]
