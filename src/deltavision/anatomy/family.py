"""What a backbone family is, and the registry of the families deltavision knows.

A :class:`Family` answers every question whose answer depends on a timm model
class: its anatomy, how it embeds images, its residual branches, how a tapped
block runs, how its stream lies on the image grid, how its head reads the last
stream, its stage outputs for dense heads and its default LoRA targets. Code
outside ``anatomy/families/`` asks the Family and never names one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import IncompatibleMethodError
from .core import Anatomy
from .layout import Grid, grid_of, to_nchw_map

Branch = Callable[[torch.Tensor], torch.Tensor]


class Family:
    """One timm model class. Subclasses set ``name``, ``model_class`` and ``layout`` and fill the gaps."""

    name: str
    model_class: type
    layout: str
    default_lora_targets: tuple[str, ...] = ()

    def __deepcopy__(self, memo) -> Family:
        return self

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_class)

    def describe(self, model: nn.Module) -> Anatomy:
        """Blocks, stages, embedding, final layers and classifier of ``model``."""
        raise NotImplementedError

    def embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The stream entering the first block, as timm's ``forward_features`` computes it."""
        raise NotImplementedError

    def head(self, model: nn.Module, stream: torch.Tensor, num_prefix_tokens: int | None = None) -> torch.Tensor:
        """Logits from the last block's stream: final layers, pooling, classifier.

        ``num_prefix_tokens`` overrides the model's own count (prompts are prefix too).
        """
        raise NotImplementedError

    def branches(self, block: nn.Module) -> dict[str, Branch]:
        """The residual branches of ``block`` as callables on the stream ({} for single-branch blocks)."""
        return {}

    def tapped_forward(self, block: nn.Module, taps, x: torch.Tensor) -> torch.Tensor:
        """``block``'s forward with its taps (:class:`~.taps.BlockTaps`) run at their places."""
        raise NotImplementedError

    def lora_targets(self, model: nn.Module) -> tuple[str, ...]:
        """Block-relative layer names LoRA adapts by default (empty: none that fit)."""
        return self.default_lora_targets

    def patch_grid(self, model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """H x W of a token stream for images of ``image_size`` (None: the stream's shape tells)."""
        return None

    def grid(self, model: nn.Module, stream: torch.Tensor, image_size: tuple[int, int]) -> Grid:
        """How ``stream`` (from images of ``image_size``) lies on the image grid."""
        return grid_of(stream, self.layout, self.patch_grid(model, image_size))

    def grid_tracker(self, model: nn.Module) -> Callable[[torch.Tensor], Grid]:
        """stream -> Grid for streams inside blocks, where the image size is no longer at hand."""
        return lambda stream: grid_of(stream, self.layout)

    def stage_outputs(self, model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage as an NCHW map (prefix tokens dropped), like ``features_only``.

        Hierarchical families give strides 4/8/16/32 (or their own); a plain ViT gives its
        last block's patch tokens as one map.
        """
        anatomy = self.describe(model)
        stream, maps = self.embed(model, images), []
        for stage in anatomy.stages:
            if stage.downsample:
                stream = model.get_submodule(stage.downsample)(stream)
            for index in stage.blocks:
                stream = model.get_submodule(anatomy.blocks[index].name)(stream)
            maps.append(to_nchw_map(stream, self.grid(model, stream, tuple(images.shape[-2:]))))
        return maps


class TransformerFamily(Family):
    """Blocks of two pre-norm residual branches, attention then MLP."""

    def tapped_forward(self, block: nn.Module, taps, x: torch.Tensor) -> torch.Tensor:
        grid, branches = taps.grid(x), self.branches(block)
        x = taps.run_all(taps.before_block, x, grid)
        x = x + taps.run_branch_out("attn", branches["attn"](x), grid)
        x = taps.run_all(taps.after_attn, x, grid)
        side = taps.run_parallel("mlp", x, grid)
        x = x + taps.run_branch_out("mlp", branches["mlp"](x), grid)
        if side is not None:
            x = x + side
        return taps.run_all(taps.after_block, x, grid)


class ConvFamily(Family):
    """NCHW blocks with one branch, recovered as output - input when the block has an identity skip
    (after any activation that follows the sum), else the whole output."""

    layout = "nchw"

    def identity_skip(self, block: nn.Module) -> bool:
        """Whether ``block`` adds its input unchanged to its branch."""
        return True

    def tapped_forward(self, block: nn.Module, taps, x: torch.Tensor) -> torch.Tensor:
        x = taps.run_all(taps.before_block, x, taps.grid(x))
        out, grid = type(block).forward(block, x), taps.grid(x)
        if "main" in taps.branch_out:
            skip = x if self.identity_skip(block) and x.shape == out.shape else torch.zeros_like(out)
            out = skip + taps.run_branch_out("main", out - skip, grid)
        side = taps.run_parallel("main", x, grid)
        if side is not None:
            out = out + side
        return taps.run_all(taps.after_block, out, taps.grid(out))


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry; a second family of the same name is an error."""
    if family.name in _FAMILIES:
        raise ValueError(f"a backbone family named {family.name!r} is registered already")
    _FAMILIES[family.name] = family
    return family


def supported_families(layout: str | None = None) -> list[str]:
    """Names of the registered families (only those whose stream has ``layout``, if given)."""
    return [name for name, f in _FAMILIES.items() if layout is None or f.layout == layout]


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise IncompatibleMethodError(f"unknown backbone family {name!r}; known: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def family_of(model: nn.Module) -> Family | None:
    """The registered family ``model`` belongs to, or None."""
    return next((f for f in _FAMILIES.values() if f.matches(model)), None)


def describe(model: nn.Module) -> Anatomy:
    """Return the anatomy of a timm model, or raise if its family is not known."""
    family = family_of(model)
    if family is None:
        raise IncompatibleMethodError(
            f"deltavision does not know the structure of {type(model).__name__} models; "
            f"structural methods support the families: {', '.join(supported_families())}"
        )
    return family.describe(model)
