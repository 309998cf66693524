"""Gather_k: the sum of the embedding and the first k block outputs (MIST, Sec. 3.2, Eq. 6).

    Gather_k(x) = z_0 + z_1 + ... + z_k,   k in {N/4, N/2, 3N/4, N}

z_0 is the stream entering the first block as the backbone's Family embeds it
(for ViT ``patch_embed -> _pos_embed -> patch_drop -> norm_pre``: prefix
tokens and position embedding included) and z_i is the output of block i.

On a plain backbone (ViT) every block keeps the stream's shape and N is the
depth. On hierarchical backbones blocks of different stages differ in width and
resolution, so the running sum cannot simply add them. Two spans:

``span="all"`` (default; the paper's SegFormer variant, appendix Sec. 8): k
ranges over ALL N blocks of the body (Swin-T: N = 12, k in {3, 6, 9, 12}).
The running sum z_0 + ... + z_i crosses a stage boundary through that stage's
frozen downsampling module (Swin's PatchMerging, ConvNeXt's downsample), as the
stream does. A block without an identity skip (EfficientNet's and ResNet's
first block of a stage, which change resolution or width) is its stage's
downsampling: the sum passes through the block itself, exactly as the stream
does, instead of gaining the block's output. That is the only way to carry a
sum across a shape change with the backbone's own frozen layers, and it treats
such blocks like E3VA treats them. Such blocks still count towards k. Once k
blocks are summed, Gather_k is carried on through every later downsampling
(and skip-less block) without adding further outputs, so that every k yields
the same shape.

``span="last_stage"``: the sum runs along the residual stream of the last stage
that has one. Everything before it runs as the backbone runs it; z_0 is the
stream entering that stage's first residual block (after its downsampling or
its leading skip-less blocks) and N counts the stage's residual blocks. For
EfficientNet-Lite0, whose last stage is a single skip-less block, that is
``blocks.5`` (N = 3).

Layers after the last block (EfficientNet's conv_head, final norms) are never
run. Wire shape: always tokens, (B, T, C), at the last stage's resolution and
width: ViT tokens as they are (prefix tokens first), NHWC and NCHW maps
flattened row-major into H*W tokens (:func:`~deltavision.anatomy.layout.to_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...anatomy import Anatomy, describe, get_family
from ...anatomy.layout import to_tokens
from ...errors import IncompatibleMethodError
from ...train.device import check_precision, resolve_device

Layer = Callable[[torch.Tensor], torch.Tensor]


def candidate_ks(num_blocks: int) -> tuple[int, ...]:
    """The candidate set {N/4, N/2, 3N/4, N} of Sec. 3.2, rounded half up, at least 1, ascending."""
    if num_blocks < 1:
        raise ValueError(f"need at least one block to gather over, got {num_blocks}")
    return tuple(sorted({max(1, int(num_blocks * quarter / 4 + 0.5)) for quarter in (1, 2, 3, 4)}))


@dataclass(frozen=True)
class GatherShape:
    """What one image's Gather_k looks like on the wire: ``tokens`` x ``width``.

    ``grid`` is the H x W map the non-prefix tokens come from.
    """

    tokens: int
    width: int
    grid: tuple[int, int]
    num_prefix_tokens: int


@dataclass(frozen=True)
class Step:
    """A module of the body after the embedding. A block whose output ``adds`` to the running sum,
    or a layer the sum goes through (a downsampling layer, a block without an identity skip)."""

    name: str
    module: Layer
    is_block: bool
    adds: bool


SPANS = ("all", "last_stage")


class Gather:
    """Runs a timm backbone once per batch and returns Gather_k for several k (running sums).

    The model is put in eval mode; no gradient is ever taken. ``span``: "all" or "last_stage"
    (see the module docstring). The backbone runs on ``device`` (default: where its weights are),
    held in ``precision`` (fp32, bf16, or fp16 on GPUs); the features come back as float32 on the CPU.
    """

    def __init__(self, model: nn.Module, span: str = "all", device: str | None = None, precision: str = "fp32"):
        if span not in SPANS:
            raise ValueError(f"span must be one of {', '.join(SPANS)}, got {span!r}")
        self.device = resolve_device(device) if device else next(model.parameters()).device
        self.dtype = check_precision(self.device, precision) or torch.float32
        self.model = model.eval().to(device=self.device, dtype=self.dtype)  # frozen: held in the low precision
        self.anatomy = describe(model)
        self.span = span
        self.family = self.anatomy.family
        self.layout = self.anatomy.layout
        self._family = get_family(self.family)
        if span == "all":
            self._prelude, self._steps = [], self._all_steps()
        else:
            stage = _summed_stage(self.anatomy)
            lead, summed = _split_stage(self.anatomy, stage)
            self._prelude = self._prelude_layers(stage, lead)
            self._steps = [self._block_step(i) for i in summed]
        self.summed_blocks = tuple(step.name for step in self._steps if step.is_block)

    @property
    def num_blocks(self) -> int:
        """N: how many blocks Gather_N runs through (besides the embedding z_0)."""
        return len(self.summed_blocks)

    @property
    def ks(self) -> tuple[int, ...]:
        return candidate_ks(self.num_blocks)

    def __call__(self, images: torch.Tensor, ks: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """``{k: Gather_k(images)}`` as (B, T, C) float tensors, from one pass that stops at max(ks)."""
        wanted = sorted(set(self.ks if ks is None else ks))
        self._check_ks(wanted)
        sums = self._sums(images.to(self.device, self.dtype), wanted)
        return {k: to_tokens(total, self.layout).float().cpu().contiguous() for k, total in sums.items()}

    def output_shape(self, image_size: int) -> GatherShape:
        """Shape of Gather_k for one ``image_size`` x ``image_size`` image (runs one blank image)."""
        total = self._sums(torch.zeros(1, 3, image_size, image_size, device=self.device, dtype=self.dtype), [1])[1]
        grid = self._family.grid(self.model, total, (image_size, image_size))
        tokens = to_tokens(total, self.layout)
        return GatherShape(tokens.shape[1], tokens.shape[2], (int(grid.height), int(grid.width)), grid.num_prefix_tokens)

    def _sums(self, images: torch.Tensor, wanted: Sequence[int]) -> dict[int, torch.Tensor]:
        """{k: Gather_k} in the stream layout, carried to the last stage's shape."""
        gathered, done = {}, 0
        with torch.inference_mode():
            stream = self._family.embed(self.model, images)
            for layer in self._prelude:
                stream = layer(stream)
            total = stream  # z_0
            for position, step in enumerate(self._steps):
                if done == wanted[-1]:
                    break
                before, stream = stream, step.module(stream)
                if step.adds:
                    total = total + stream
                else:
                    total = stream if total is before else step.module(total)
                done += step.is_block
                if step.is_block and done in wanted:
                    gathered[done] = self._carry(total, position + 1)
        return gathered

    def _carry(self, total: torch.Tensor, start: int) -> torch.Tensor:
        """``total`` through every later layer the sum passes through, adding no more outputs."""
        for step in self._steps[start:]:
            if not step.adds:
                total = step.module(total)
        return total

    def _check_ks(self, ks: Sequence[int]) -> None:
        bad = [k for k in ks if not 1 <= k <= self.num_blocks]
        if not ks or bad:
            raise ValueError(f"k must lie in 1..{self.num_blocks} for this backbone, got {list(ks)}")

    def _all_steps(self) -> list[Step]:
        steps = []
        for stage in self.anatomy.stages:
            if stage.downsample:
                steps.append(Step(stage.downsample, self.model.get_submodule(stage.downsample), False, False))
            steps += [self._block_step(i) for i in stage.blocks]
        return steps

    def _block_step(self, index: int) -> Step:
        info = self.anatomy.blocks[index]
        return Step(info.name, self.model.get_submodule(info.name), True, info.has_skip)

    def _prelude_layers(self, stage, lead: Sequence[int]) -> list[Layer]:
        """Everything between the embedding and z_0: earlier stages, this stage's downsampling."""
        layers = []
        for earlier in self.anatomy.stages[: stage.index]:
            layers += self._stage_layers(earlier, earlier.blocks)
        return layers + self._stage_layers(stage, lead)

    def _stage_layers(self, stage, block_indices: Sequence[int]) -> list[Layer]:
        names = ([stage.downsample] if stage.downsample else []) + [self.anatomy.blocks[i].name for i in block_indices]
        return [self.model.get_submodule(name) for name in names]


def _summed_stage(anatomy: Anatomy):
    """The last stage holding at least one residual (skip) block."""
    for stage in reversed(anatomy.stages):
        if any(anatomy.blocks[i].has_skip for i in stage.blocks):
            return stage
    raise IncompatibleMethodError(f"{anatomy.family} backbone has no residual blocks to gather over")


def _split_stage(anatomy: Anatomy, stage) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(leading blocks without a skip, the residual blocks after them) of ``stage``."""
    blocks = stage.blocks
    first = next(n for n, i in enumerate(blocks) if anatomy.blocks[i].has_skip)
    lead, summed = blocks[:first], blocks[first:]
    if not all(anatomy.blocks[i].has_skip for i in summed):
        raise IncompatibleMethodError(
            f"stage {stage.index} of this {anatomy.family} backbone changes shape after its first residual "
            "block, so its block outputs cannot be summed"
        )
    return lead, summed
