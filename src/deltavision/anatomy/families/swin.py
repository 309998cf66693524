"""Swin (timm ``SwinTransformer``): hierarchical stages on an NHWC grid; PatchMerging opens stages 1..n."""

from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer

from ..core import Anatomy
from ..family import TransformerFamily, register_family
from ._parts import classifier_name, staged_blocks


class SwinFamily(TransformerFamily):
    name = "swin"
    model_class = SwinTransformer
    layout = "nhwc"
    default_lora_targets = ("q", "v")

    def describe(self, model: SwinTransformer) -> Anatomy:
        blocks, stages = staged_blocks(model, "layers", lambda block: "transformer")
        return Anatomy(
            family=self.name,
            layout=self.layout,
            num_prefix_tokens=0,
            embed=("patch_embed",),
            blocks=blocks,
            stages=stages,
            final=("norm",),
            classifier=classifier_name(model),
            patch_size=model.patch_embed.patch_size[0],
        )

    def embed(self, model, images):
        return model.patch_embed(images)

    def head(self, model, stream, num_prefix_tokens=None):
        return model.forward_head(model.norm(stream))

    def branches(self, block):
        return {
            "attn": lambda x: block.drop_path1(block._attn(block.norm1(x))),
            "mlp": lambda x: block.drop_path2(block.mlp(block.norm2(x))),
        }


SWIN = register_family(SwinFamily())
