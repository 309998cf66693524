"""EfficientNet / MobileNet-style (timm ``EfficientNet``): NCHW stages of (inverted-)residual blocks.

Downsampling happens inside the first block of a stage (a strided depth-wise
convolution), so stages have no separate downsample module; blocks that change
resolution or width have no skip ("plain").
"""

from __future__ import annotations

from timm.models.efficientnet import EfficientNet
from torch import nn

from ..core import Anatomy, Block, Stage
from ..family import ConvFamily, register_family
from ._parts import classifier_name


def _width(block: nn.Module) -> int:
    return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features


class EfficientNetFamily(ConvFamily):
    name = "efficientnet"
    model_class = EfficientNet
    default_lora_targets = ("conv_pw", "conv_pwl")

    def describe(self, model: EfficientNet) -> Anatomy:
        blocks, stages = [], []
        for s, stage in enumerate(model.blocks):
            first = len(blocks)
            for j, block in enumerate(stage):
                kind = "residual" if self.identity_skip(block) else "plain"
                blocks.append(Block(f"blocks.{s}.{j}", s, kind, _width(block)))
            stages.append(Stage(s, None, tuple(range(first, len(blocks))), _width(stage[-1])))
        return Anatomy(
            family=self.name,
            layout=self.layout,
            num_prefix_tokens=0,
            embed=("conv_stem", "bn1"),
            blocks=tuple(blocks),
            stages=tuple(stages),
            final=("conv_head", "bn2"),
            classifier=classifier_name(model),
            patch_size=model.conv_stem.stride[0],
        )

    def embed(self, model, images):
        return model.bn1(model.conv_stem(images))

    def head(self, model, stream, num_prefix_tokens=None):
        return model.forward_head(model.bn2(model.conv_head(stream)))

    def identity_skip(self, block):
        return getattr(block, "has_skip", False)


EFFICIENTNET = register_family(EfficientNetFamily())
