"""Gather_k: the sum of the embedding and the first k block outputs (MIST, Sec. 3.2, Eq. 6).

    Gather_k(x) = z_0 + z_1 + ... + z_k,   k in {N/4, N/2, 3N/4, N}

Plain backbones (ViT family): z_0 is the embedding output as the blocks see it,
i.e. ``patch_embed -> _pos_embed -> patch_drop -> norm_pre`` (prefix tokens and
position embedding included), and z_i is the output of block i. N is the depth.

Hierarchical and convolutional backbones (Swin, ConvNeXt, EfficientNet): blocks
of different stages differ in width and resolution, so they cannot be summed.
The sum runs along the residual stream of the last stage that has one:

- the layers before that stream run exactly as the backbone runs them (the
  embedding modules, then every earlier stage's downsample and blocks);
- z_0 is the stream entering that stage's first residual block, that is the
  stage input after its downsampling: Swin's PatchMerging, ConvNeXt's
  downsample, or, for EfficientNet, the stage's leading strided and
  width-changing block(s), which have no skip connection;
- z_1..z_N are the outputs of the stage's residual blocks.

"Last stage that has one" matters for EfficientNet: its final stage is a single
width-changing block with no skip (tf_efficientnet_lite0: blocks.6, 192 -> 320
channels), so the stream summed is the one before it (blocks.5: z_0 = output of
blocks.5.0, N = 3). Layers after the summed stream (EfficientNet's last stage and
conv_head, the final norms) are not run: they are not part of any z_i. This
differs from the paper's SegFormer variant (appendix Sec. 8), which pushes the
sum through every stage's downsampling module.

Output layout is always tokens, (B, T, C): ViT tokens as they are (prefix
tokens first), NHWC and NCHW maps flattened row-major into H*W tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...anatomy import Anatomy, describe
from ...errors import IncompatibleMethodError

Layer = Callable[[torch.Tensor], torch.Tensor]


def candidate_ks(num_blocks: int) -> tuple[int, ...]:
    """The candidate set {N/4, N/2, 3N/4, N} of Sec. 3.2, rounded half up, at least 1, ascending."""
    if num_blocks < 1:
        raise ValueError(f"need at least one block to gather over, got {num_blocks}")
    return tuple(sorted({max(1, int(num_blocks * quarter / 4 + 0.5)) for quarter in (1, 2, 3, 4)}))


def to_tokens(stream: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, T, C) view of a stream in ``layout`` ("tokens", "nhwc" or "nchw")."""
    if layout == "tokens":
        return stream
    if layout == "nhwc":
        return stream.flatten(1, 2)
    return stream.flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class GatherShape:
    """What one image's Gather_k looks like on the wire: ``tokens`` x ``width``.

    ``grid`` is the H x W map the non-prefix tokens come from.
    """

    tokens: int
    width: int
    grid: tuple[int, int]
    num_prefix_tokens: int


class Gather:
    """Runs a timm backbone once per batch and returns Gather_k for several k (running sums).

    The model is put in eval mode; no gradient is ever taken.
    """

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        self.anatomy = describe(model)
        stage = _summed_stage(self.anatomy)
        lead, summed = _split_stage(self.anatomy, stage)
        self.family = self.anatomy.family
        self.layout = self.anatomy.layout
        self.summed_blocks = tuple(self.anatomy.blocks[i].name for i in summed)
        self._prelude = self._prelude_layers(stage, lead)
        self._blocks = [model.get_submodule(name) for name in self.summed_blocks]

    @property
    def num_blocks(self) -> int:
        """N: how many block outputs Gather_N sums (besides z_0)."""
        return len(self._blocks)

    @property
    def ks(self) -> tuple[int, ...]:
        return candidate_ks(self.num_blocks)

    def __call__(self, images: torch.Tensor, ks: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """``{k: Gather_k(images)}`` as (B, T, C) float tensors, from one pass that stops at max(ks)."""
        wanted = sorted(set(self.ks if ks is None else ks))
        self._check_ks(wanted)
        gathered = {}
        with torch.inference_mode():
            stream = images
            for layer in self._prelude:
                stream = layer(stream)
            total = stream  # z_0
            for index, block in enumerate(self._blocks[: wanted[-1]], start=1):
                stream = block(stream)
                total = total + stream
                if index in wanted:
                    gathered[index] = to_tokens(total, self.layout).contiguous()
        return gathered

    def output_shape(self, image_size: int) -> GatherShape:
        """Shape of Gather_k for one ``image_size`` x ``image_size`` image (runs one blank image)."""
        probe = torch.zeros(1, 3, image_size, image_size)
        with torch.inference_mode():
            stream = probe
            for layer in self._prelude:
                stream = layer(stream)
        prefix = self.anatomy.num_prefix_tokens if self.layout == "tokens" else 0
        tokens = to_tokens(stream, self.layout)
        return GatherShape(tokens.shape[1], tokens.shape[2], self._grid(stream, image_size), prefix)

    def _grid(self, stream: torch.Tensor, image_size: int) -> tuple[int, int]:
        if self.layout == "nhwc":
            return (stream.shape[1], stream.shape[2])
        if self.layout == "nchw":
            return (stream.shape[2], stream.shape[3])
        height, width = self.model.patch_embed.dynamic_feat_size((image_size, image_size))
        return (int(height), int(width))

    def _check_ks(self, ks: Sequence[int]) -> None:
        bad = [k for k in ks if not 1 <= k <= self.num_blocks]
        if not ks or bad:
            raise ValueError(f"k must lie in 1..{self.num_blocks} for this backbone, got {list(ks)}")

    def _prelude_layers(self, stage, lead: Sequence[int]) -> list[Layer]:
        """Everything that runs before z_0: embedding, earlier stages, this stage's downsampling."""
        layers = [_vit_embedding(self.model)] if self.family == "vit" else self._modules(self.anatomy.embed)
        for earlier in self.anatomy.stages[: stage.index]:
            layers += self._stage_layers(earlier, earlier.blocks)
        return layers + self._stage_layers(stage, lead)

    def _stage_layers(self, stage, block_indices: Sequence[int]) -> list[Layer]:
        names = ([stage.downsample] if stage.downsample else []) + [self.anatomy.blocks[i].name for i in block_indices]
        return self._modules(names)

    def _modules(self, names: Iterable[str]) -> list[Layer]:
        return [self.model.get_submodule(name) for name in names]


def _vit_embedding(model: nn.Module) -> Layer:
    """timm VisionTransformer's embedding, as forward_features runs it before the blocks."""

    def embed(images: torch.Tensor) -> torch.Tensor:
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))

    return embed


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
