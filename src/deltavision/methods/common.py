"""Helpers shared by methods: module lookup, replacement and freezing."""

from __future__ import annotations

from torch import nn

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, new)


def unfreeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(True)


def body_named_modules(model: nn.Module, anatomy) -> list[tuple[str, nn.Module]]:
    """All (qualified name, module) pairs of the body, in order, classifier excluded."""
    found = []
    for top in anatomy.body_modules():
        for rel, module in get_module(model, top).named_modules():
            found.append((f"{top}.{rel}" if rel else top, module))
    return found
