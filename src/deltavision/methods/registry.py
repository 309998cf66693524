"""String registry of tuning methods.

A method is one module holding a config dataclass and an ``apply`` function
(and a ``merge`` function when it folds into the backbone's weights). Methods
register themselves with :func:`register_method`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..errors import MethodOptionError, UnknownMethodError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    apply: Callable[[nn.Module, Any, Any], None]
    merge: Callable[[nn.Module, Any], None] | None
    summary: str
    families: frozenset[str] | None  # None: every family
    default_lr: float = 1e-2  # AdamW step that suits the method under the default budget
    # BatchNorms whose affine trains also re-estimate their running statistics. Only for methods
    # that train whole layers (full, partial); the others adapt features the frozen statistics describe.
    batch_stats: bool = False

    @property
    def folds(self) -> bool:
        return self.merge is not None


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str, config_cls: type, summary: str, merge=None, families=None, default_lr=1e-2, batch_stats=False
):
    """Decorator for a method's ``apply(model, anatomy, config)``."""

    def wrap(apply):
        _METHODS[name] = MethodSpec(
            name=name, config_cls=config_cls, apply=apply, merge=merge, summary=summary,
            families=frozenset(families) if families else None, default_lr=default_lr, batch_stats=batch_stats,
        )
        return apply

    return wrap


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; choose one of: {', '.join(list_methods())}")
    return _METHODS[name]


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Turn a CLI string (or a JSON value) into the field's declared type."""
    target = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Union else annotation
    if isinstance(target, str):  # postponed annotations
        target = {"int": int, "float": float, "bool": bool, "str": str}.get(target.split("|")[0].strip(), str)
    if not isinstance(value, str) or target is str:
        if target is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, list):
            return tuple(value)
        return value
    try:
        if target is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if target in (int, float):
            return target(value)
        if typing.get_origin(target) is tuple or target is tuple:
            return tuple(v.strip() for v in value.split(",") if v.strip())
    except ValueError:
        raise MethodOptionError(f"option {key}={value!r} is not a valid {getattr(target, '__name__', target)}")
    return value


def make_config(spec: MethodSpec, options: dict[str, Any] | None) -> Any:
    """Build the method's config dataclass from user options, rejecting unknown keys."""
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "none"
        raise MethodOptionError(
            f"method {spec.name!r} has no option {', '.join(map(repr, unknown))}; valid options: {valid}"
        )
    hints = typing.get_type_hints(spec.config_cls)
    values = {k: _convert(v, hints.get(k, str), k) for k, v in options.items()}
    try:
        config = spec.config_cls(**values)
    except (TypeError, ValueError) as err:
        raise MethodOptionError(f"bad options for method {spec.name!r}: {err}") from err
    return config


def parse_option_pairs(pairs: list[str]) -> dict[str, str]:
    """Parse ``["k=v", ...]`` from the command line."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise MethodOptionError(f"option {pair!r} should look like key=value")
        options[key.strip()] = value.strip()
    return options
