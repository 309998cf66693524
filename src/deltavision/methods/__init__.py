"""Tuning methods, registered by name. Importing this package registers them all."""

from . import adapters, baselines, e3va, lora, mona, ssf, vpt  # noqa: F401  (registration side effects)
from .registry import MethodSpec, get_method, list_methods, make_config, register_method

__all__ = ["MethodSpec", "get_method", "list_methods", "make_config", "register_method"]
