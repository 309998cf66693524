"""ConvNeXt (timm ``ConvNeXt``): NCHW stages; each block has one residual branch (dw-conv, norm, MLP)."""

from __future__ import annotations

from timm.models.convnext import ConvNeXt
from torch import nn

from ..core import Anatomy
from ..family import ConvFamily, register_family
from ._parts import classifier_name, staged_blocks


class ConvNeXtFamily(ConvFamily):
    name = "convnext"
    model_class = ConvNeXt
    default_lora_targets = ("fc1", "fc2")

    def describe(self, model: ConvNeXt) -> Anatomy:
        blocks, stages = staged_blocks(model, "stages", lambda block: "residual")
        return Anatomy(
            family=self.name,
            layout=self.layout,
            num_prefix_tokens=0,
            embed=("stem",),
            blocks=blocks,
            stages=stages,
            final=("norm_pre", "head.norm") if hasattr(model.head, "norm") else ("norm_pre",),
            classifier=classifier_name(model),
            patch_size=model.feature_info[0]["reduction"],
        )

    def embed(self, model, images):
        return model.stem(images)

    def head(self, model, stream, num_prefix_tokens=None):
        return model.forward_head(model.norm_pre(stream))

    def identity_skip(self, block):
        return isinstance(getattr(block, "shortcut", None) or nn.Identity(), nn.Identity)


CONVNEXT = register_family(ConvNeXtFamily())
