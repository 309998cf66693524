"""ResNet (timm ``ResNet``): a stem (conv1, bn1, act1, maxpool), then layer1..4 of BasicBlocks or
Bottlenecks.

The first block of a stage usually changes resolution or width and then adds a
projection of its input (``downsample``) instead of the input itself: such
blocks are "plain" (no identity skip), like EfficientNet's skip-less blocks.
A block's branch, for the taps, is its output minus its input, and the output
is taken after the ReLU that follows the sum. The body overwrites BatchNorm
outputs in place (in-place ReLUs, ``x += shortcut``).

Default LoRA targets: the 1x1 convolutions of a Bottleneck's branch (conv1,
which reduces the width, and conv3, which expands it). A BasicBlock has only
3x3 convolutions, so BasicBlock ResNets have no default; LoRA then asks for
``targets`` (e.g. ``downsample.0``, the 1x1 projections).
"""

from __future__ import annotations

from timm.models.resnet import Bottleneck, ResNet

from ..core import Anatomy, Block, Stage
from ..family import ConvFamily, register_family
from ._parts import classifier_name, present

STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetFamily(ConvFamily):
    name = "resnet"
    model_class = ResNet

    def describe(self, model: ResNet) -> Anatomy:
        blocks, stages = [], []
        for s, stage_name in enumerate(STAGES):
            stage, first = getattr(model, stage_name), len(blocks)
            width = model.feature_info[s + 1]["num_chs"]
            for j, block in enumerate(stage):
                kind = "residual" if self.identity_skip(block) else "plain"
                blocks.append(Block(f"{stage_name}.{j}", s, kind, width))
            stages.append(Stage(s, None, tuple(range(first, len(blocks))), width))
        return Anatomy(
            family=self.name,
            layout=self.layout,
            num_prefix_tokens=0,
            embed=present(model, ("conv1", "bn1", "act1", "maxpool")),
            blocks=tuple(blocks),
            stages=tuple(stages),
            final=(),
            classifier=classifier_name(model),
            patch_size=model.feature_info[1]["reduction"],
            inplace_after_norm=True,
        )

    def embed(self, model, images):
        return model.maxpool(model.act1(model.bn1(model.conv1(images))))

    def head(self, model, stream, num_prefix_tokens=None):
        return model.forward_head(stream)

    def identity_skip(self, block):
        return block.downsample is None

    def lora_targets(self, model):
        return ("conv1", "conv3") if isinstance(model.layer1[0], Bottleneck) else ()


RESNET = register_family(ResNetFamily())
