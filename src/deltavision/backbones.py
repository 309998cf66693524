"""Building timm backbones with real pretrained weights, from the hub or a local file."""

from __future__ import annotations

import difflib
import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from .errors import UnknownBackboneError, WeightsUnavailableError

from .defaults import EMBEDDED_BACKBONE  # noqa: F401  (re-exported)


def check_backbone_name(name: str) -> None:
    if not timm.is_model(name):
        close = suggest_backbones(name)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models()` lists them"
        raise UnknownBackboneError(f"unknown backbone {name!r}{hint}")


def suggest_backbones(name: str, n: int = 3) -> list[str]:
    """timm names close to ``name``; the embedded backbone first when it is close, since it alone
    has weights offline."""
    embedded = difflib.get_close_matches(name, [EMBEDDED_BACKBONE], n=1, cutoff=0.6)
    others = [c for c in difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.6) if c != EMBEDDED_BACKBONE]
    shown = [f"{EMBEDDED_BACKBONE} (embedded: pretrained weights offline)" for _ in embedded]
    return (shown + others)[:n]


def create_backbone(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head.

    Weights come from ``checkpoint`` (a local .safetensors/.pth/.bin state dict) if
    given; otherwise, when ``pretrained``, from the package-shipped file for the
    embedded default, or from the Hugging Face hub through timm.
    """
    check_backbone_name(name)
    options = dict(options or {})
    if checkpoint is not None:
        return _from_file(name, num_classes, Path(checkpoint), options)
    if pretrained and name == EMBEDDED_BACKBONE and not options:
        from .embedded import embedded_weights_path

        return _from_file(name, num_classes, embedded_weights_path(), options)
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **options)
    reason = _why_no_download(name)
    if reason:
        raise WeightsUnavailableError(_no_weights_message(name, reason))
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, **options)
    except (OSError, RuntimeError, ValueError) as err:  # hub offline, no weights, HTTP errors
        raise WeightsUnavailableError(_no_weights_message(name, f"{type(err).__name__}: {_first_line(err)}")) from err


def _no_weights_message(name: str, reason: str) -> str:
    return (
        f"could not get pretrained weights for {name!r} ({reason}). "
        "With no network, download them elsewhere and pass --checkpoint FILE "
        "(Python: checkpoint=FILE), or train from random init with --no-pretrained"
    )


HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _why_no_download(name: str) -> str | None:
    """Why timm's download of ``name``'s weights would fail, found without waiting on the network.

    None when the weights are in the local hub (or torch hub) cache, or the weights'
    host answers; otherwise the reason: offline mode (``HF_HUB_OFFLINE``) or no route
    to the host. timm itself would retry for about a minute before failing.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or _cached_locally(cfg):
        return None
    if _hub_offline():
        return "HF_HUB_OFFLINE is set and they are not in the local Hugging Face cache"
    host = urlparse(_download_url(cfg)).hostname
    if host and not _reachable(host):
        return f"not in the local cache, and {host} cannot be reached"
    return None


def _cached_locally(cfg) -> bool:
    from huggingface_hub import try_to_load_from_cache

    if cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES
        return any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in files)
    if cfg.url:
        return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name).is_file()
    return True  # weights from a file or state dict named in the config: timm's own path


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.HF_HUB_OFFLINE or flag in ("1", "ON", "YES", "TRUE")


def _download_url(cfg) -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT if cfg.hf_hub_id else (cfg.url or "")


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_file(name: str, num_classes: int, path: Path, options: dict) -> nn.Module:
    """Build ``name`` and load a local state dict strictly (the classifier may differ in size)."""
    if not path.is_file():
        raise WeightsUnavailableError(f"checkpoint {path} does not exist")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **options)
    state = _read_state_dict(path)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as err:  # the file is not a checkpoint of this family
            raise WeightsUnavailableError(f"checkpoint {path} does not fit backbone {name!r}: {_first_line(err)}") from err
    _load_strictly_but_head(model, state, path, name)
    return model


def _read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, not a checkpoint, or pickled code refused
        raise WeightsUnavailableError(f"checkpoint {path} could not be read: {_first_line(err)}") from err
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"checkpoint {path} does not hold a state dict")
    return state


def _load_strictly_but_head(model: nn.Module, state: dict, path: Path, name: str) -> None:
    """Every backbone tensor must be in the file with its shape; the head loads only if it fits."""
    own = model.state_dict()
    head_keys = {k for k in own if _is_classifier_key(model, k)}
    state = {k: v for k, v in state.items() if not (_is_classifier_key(model, k) and k in own and v.shape != own[k].shape)}
    state = {k: v for k, v in state.items() if not (_is_classifier_key(model, k) and k not in own)}
    mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state) - head_keys)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected or mismatched:
        raise WeightsUnavailableError(
            f"checkpoint {path} does not fit backbone {name!r}: {len(missing)} tensors missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(mismatched)} of another shape (e.g. {mismatched[:2]})"
        )
    model.load_state_dict(state, strict=False)


def _is_classifier_key(model: nn.Module, key: str) -> bool:
    classifiers = model.pretrained_cfg.get("classifier", "head")
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    return any(key.startswith(c + ".") for c in classifiers)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
