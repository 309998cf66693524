"""The one ``key=value`` grammar for method options and backbone options.

The command line (``--opt``, ``--backbone-opt``), the feature service and
Python keyword arguments all end here:

- a method option is converted to the type its config dataclass declares
  (``int``, ``float``, ``bool``, ``str``, ``tuple``);
- a backbone option has no declared type (it is a timm keyword argument), so
  its text is read as a literal: ``true``/``false``, ``none``, an integer, a
  float, a tuple written ``1,1,2`` or ``(1, 1, 2)``, else a string.

Values that are not strings (Python keyword arguments, JSON from an adapter
config) keep their type, except that lists become tuples and integers become
floats where a float is declared.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from .errors import MethodOptionError

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
NAMED_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple}


def parse_pairs(pairs: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; anything without ``=`` or a key is refused."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise MethodOptionError(f"option {pair!r} should look like key=value")
        options[key.strip()] = value.strip()
    return options


def parse_literal(text: str) -> Any:
    """A backbone option's text as a Python value (see the module docstring)."""
    text = text.strip()
    inner = text[1:-1] if text[:1] in "([" and text[-1:] in ")]" else None
    if inner is not None or "," in text:
        return tuple(parse_literal(part) for part in (text if inner is None else inner).split(",") if part.strip())
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip("'\"")


def backbone_options(pairs: list[str] | None) -> dict[str, Any]:
    """``--backbone-opt`` pairs as timm keyword arguments."""
    return {key: parse_literal(value) for key, value in parse_pairs(pairs).items()}


def build_config(config_cls: type, options: dict[str, Any] | None, owner: str) -> Any:
    """``config_cls(**options)`` with every value converted to its declared type.

    Unknown keys and values that do not convert raise :class:`MethodOptionError`
    naming ``owner`` (the method) and the valid options.
    """
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise MethodOptionError(f"method {owner!r} has no option {', '.join(map(repr, unknown))}; valid options: {valid}")
    hints = typing.get_type_hints(config_cls)
    values = {key: convert(value, hints.get(key, str), key) for key, value in options.items()}
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as err:
        if isinstance(err, MethodOptionError):
            raise
        raise MethodOptionError(f"bad options for method {owner!r}: {err}") from err


def config_options(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON-ready options (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def convert(value: Any, annotation: Any, key: str) -> Any:
    """``value`` (a CLI string or a JSON/Python value) as the declared type ``annotation``."""
    target = _declared_type(annotation)
    if not isinstance(value, str):
        if target is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return tuple(value) if isinstance(value, list) else value
    try:
        if target is bool:
            return _parse_bool(value)
        if target in (int, float):
            return target(value)
        if target is tuple:
            return tuple(part.strip() for part in value.split(",") if part.strip())
    except ValueError:
        raise MethodOptionError(f"option {key}={value!r} is not a valid {target.__name__}") from None
    return value


def _declared_type(annotation: Any) -> type:
    if isinstance(annotation, str):  # postponed annotations: "int", "float | None", "tuple"
        return NAMED_TYPES.get(annotation.split("|")[0].split("[")[0].strip(), str)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = typing.get_args(annotation)[0]
    origin = typing.get_origin(annotation)
    return tuple if (origin is tuple or annotation is tuple) else (annotation if isinstance(annotation, type) else str)


def _parse_bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise ValueError(text)
