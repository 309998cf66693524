"""Building timm backbones with real pretrained weights, from the hub or a local file."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
from torch import nn

from .errors import UnknownBackboneError, WeightsUnavailableError

EMBEDDED_BACKBONE = "tf_efficientnet_lite0"


def check_backbone_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models()` lists them"
        raise UnknownBackboneError(f"unknown backbone {name!r}{hint}")


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
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, **options)
    except (OSError, RuntimeError, ValueError) as err:  # hub offline, no weights, HTTP errors
        raise WeightsUnavailableError(
            f"could not get pretrained weights for {name!r} ({type(err).__name__}: {_first_line(err)}). "
            "With no network, download them elsewhere and pass --checkpoint FILE "
            "(Python: checkpoint=FILE), or train from random init with --no-pretrained"
        ) from err


def _from_file(name: str, num_classes: int, path: Path, options: dict) -> nn.Module:
    if not path.is_file():
        raise WeightsUnavailableError(f"checkpoint {path} does not exist")
    try:
        return timm.create_model(
            name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": str(path)}, **options
        )
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise WeightsUnavailableError(
            f"checkpoint {path} does not fit backbone {name!r}: {_first_line(err)}"
        ) from err
    except Exception as err:  # unpickling errors and the like from a non-checkpoint file
        raise WeightsUnavailableError(f"checkpoint {path} could not be read: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
