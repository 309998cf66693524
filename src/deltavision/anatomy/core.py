"""Anatomy records and the family dispatch."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import IncompatibleMethodError


@dataclass(frozen=True)
class Block:
    """One residual block.

    ``branches`` maps a branch name ("attn", "mlp" for transformers, "main" for
    convolutional blocks) to the block-relative names of the modules on that
    residual branch, in execution order.
    """

    name: str
    stage: int
    kind: str
    width: int
    branches: dict[str, tuple[str, ...]]

    @property
    def has_skip(self) -> bool:
        """Input and output share shape and are summed (an EfficientNet "plain" block is not)."""
        return self.kind != "plain"


@dataclass(frozen=True)
class Stage:
    """A run of blocks at one resolution; ``downsample`` enters it (None: no module of its own)."""

    index: int
    downsample: str | None
    blocks: tuple[int, ...]
    width: int


@dataclass(frozen=True)
class Anatomy:
    """Structure of one backbone instance.

    layout: "tokens" (B, N, C with ``num_prefix_tokens`` before the patch grid),
    "nhwc" (B, H, W, C) or "nchw" (B, C, H, W): the layout of the stream between blocks.
    """

    family: str
    layout: str
    num_prefix_tokens: int
    embed: tuple[str, ...]
    blocks: tuple[Block, ...]
    stages: tuple[Stage, ...]
    final: tuple[str, ...]
    classifier: str
    patch_size: int = 1
    extra: dict = field(default_factory=dict)

    def body_modules(self) -> tuple[str, ...]:
        """Every top-level part of the body (embedding, blocks, downsamples, final), not the classifier."""
        downsamples = tuple(s.downsample for s in self.stages if s.downsample)
        return self.embed + tuple(b.name for b in self.blocks) + downsamples + self.final

    def last_blocks(self, k: int) -> tuple[Block, ...]:
        return self.blocks[len(self.blocks) - k :] if k > 0 else ()


_DESCRIBERS: list[tuple[str, type, object]] = []


def register_family(name: str, model_cls: type):
    """Decorator registering ``describe_<family>(model) -> Anatomy`` for a timm model class."""

    def wrap(fn):
        _DESCRIBERS.append((name, model_cls, fn))
        return fn

    return wrap


def supported_families() -> list[str]:
    return [name for name, _, _ in _DESCRIBERS]


def family_of(model: nn.Module) -> str | None:
    for name, cls, _ in _DESCRIBERS:
        if isinstance(model, cls):
            return name
    return None


def describe(model: nn.Module) -> Anatomy:
    """Return the anatomy of a timm model, or raise if its family is not known."""
    for _, cls, fn in _DESCRIBERS:
        if isinstance(model, cls):
            return fn(model)
    raise IncompatibleMethodError(
        f"deltavision does not know the structure of {type(model).__name__} models; "
        f"structural methods support the families: {', '.join(supported_families())}"
    )


from . import families  # noqa: E402,F401  (registers the families)
