"""The string registry of tuning methods (see :mod:`.base` for the contract)."""

from __future__ import annotations

from typing import Any

from ..errors import UnknownMethodError
from ..options import build_config
from .base import MethodSpec

_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type, summary: str, **capabilities: Any):
    """Decorator registering ``apply`` under ``name``; ``capabilities`` are :class:`MethodSpec` fields.

    A name can be registered once: a second registration is a programming error.
    """

    def wrap(apply):
        if name in _METHODS:
            raise ValueError(f"a method named {name!r} is registered already")
        families = capabilities.pop("families", None)
        _METHODS[name] = MethodSpec(
            name=name, config_cls=config_cls, apply=apply, summary=summary,
            families=frozenset(families) if families else None, **capabilities,
        )
        return apply

    return wrap


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; choose one of: {', '.join(list_methods())}")
    return _METHODS[name]


def make_config(spec: MethodSpec, options: dict[str, Any] | None) -> Any:
    """The method's config dataclass from user options (typed by :mod:`deltavision.options`)."""
    return build_config(spec.config_cls, options, spec.name)
