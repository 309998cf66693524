"""ViT / DeiT (timm ``VisionTransformer``): one stage of pre-norm blocks on a token sequence."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer, global_pool_nlc
from torch import nn

from ..core import Anatomy, Block, Stage
from ..family import TransformerFamily, register_family
from ..layout import Grid, grid_of
from ._parts import classifier_name, present


class _PatchGridTracker:
    """Remembers the patch grid of the last image batch ``patch_embed`` saw."""

    def __init__(self, patch_embed: nn.Module):
        self.size = tuple(patch_embed.grid_size)
        patch_embed.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        self.size = tuple(module.dynamic_feat_size(tuple(args[0].shape[-2:])))

    def __call__(self, stream: torch.Tensor) -> Grid:
        return grid_of(stream, "tokens", self.size)


class ViTFamily(TransformerFamily):
    """Prefix tokens (class, register) come first; the position embedding is added in ``embed``."""

    name = "vit"
    model_class = VisionTransformer
    layout = "tokens"
    default_lora_targets = ("q", "v")

    def describe(self, model: VisionTransformer) -> Anatomy:
        width = model.embed_dim
        blocks = tuple(Block(f"blocks.{i}", 0, "transformer", width) for i in range(len(model.blocks)))
        return Anatomy(
            family=self.name,
            layout=self.layout,
            num_prefix_tokens=model.num_prefix_tokens,
            embed=present(model, ("patch_embed", "norm_pre")),
            blocks=blocks,
            stages=(Stage(0, None, tuple(range(len(blocks))), width),),
            final=present(model, ("norm", "fc_norm")),
            classifier=classifier_name(model),
            patch_size=model.patch_embed.patch_size[0],
        )

    def embed(self, model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))

    def head(self, model, stream, num_prefix_tokens=None):
        x = model.norm(stream)
        if model.attn_pool is not None:
            x = model.attn_pool(x)
        else:
            prefix = model.num_prefix_tokens if num_prefix_tokens is None else num_prefix_tokens
            x = global_pool_nlc(x, pool_type=model.global_pool, num_prefix_tokens=prefix)
        return model.head(model.head_drop(model.fc_norm(x)))

    def branches(self, block):
        return {
            "attn": lambda x: block.drop_path1(block.ls1(block.attn(block.norm1(x)))),
            "mlp": lambda x: block.drop_path2(block.ls2(block.mlp(block.norm2(x)))),
        }

    def patch_grid(self, model, image_size):
        return tuple(model.patch_embed.dynamic_feat_size(tuple(image_size)))

    def grid_tracker(self, model):
        return _PatchGridTracker(model.patch_embed)


VIT = register_family(ViTFamily())
__all__ = ["VIT", "ViTFamily"]
