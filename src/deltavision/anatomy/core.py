"""Anatomy records: what a backbone instance is made of, in names of its modules."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """One block of the body.

    kind: "transformer" (two residual branches, "attn" and "mlp"), "residual"
    (one residual branch, "main", summed with an identity skip) or "plain"
    (input and output differ in shape, or the skip is a projection: no stream
    to add a branch to).
    """

    name: str
    stage: int
    kind: str
    width: int

    @property
    def has_skip(self) -> bool:
        """Input and output share shape and are summed through an identity skip."""
        return self.kind != "plain"

    @property
    def branches(self) -> tuple[str, ...]:
        """Names of the residual branches a method can tap."""
        return ("attn", "mlp") if self.kind == "transformer" else ("main",)


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

    layout: the layout of the stream between blocks (see :mod:`.layout`).
    inplace_after_norm: the body overwrites normalisation outputs in place
    (in-place activations, a skip added in place), so a method must not keep
    those outputs for backward.
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
    inplace_after_norm: bool = False

    def body_modules(self) -> tuple[str, ...]:
        """Every top-level part of the body (embedding, blocks, downsamples, final), not the classifier."""
        downsamples = tuple(s.downsample for s in self.stages if s.downsample)
        return self.embed + tuple(b.name for b in self.blocks) + downsamples + self.final

    def last_blocks(self, k: int) -> tuple[Block, ...]:
        return self.blocks[len(self.blocks) - k :] if k > 0 else ()
