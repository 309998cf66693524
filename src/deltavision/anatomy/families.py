"""Anatomy of the timm families deltavision knows: ViT, Swin, ConvNeXt, EfficientNet."""

from __future__ import annotations

from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .core import Anatomy, Block, Stage, register_family

TRANSFORMER_BRANCHES_VIT = {
    "attn": ("norm1", "attn", "ls1", "drop_path1"),
    "mlp": ("norm2", "mlp", "ls2", "drop_path2"),
}
TRANSFORMER_BRANCHES_SWIN = {
    "attn": ("norm1", "attn", "drop_path1"),
    "mlp": ("norm2", "mlp", "drop_path2"),
}


def _present(module: nn.Module, names) -> tuple[str, ...]:
    return tuple(n for n in names if hasattr(module, n))


def _classifier(model: nn.Module) -> str:
    return model.pretrained_cfg.get("classifier", "head")


def _staged_blocks(model: nn.Module, stages_attr: str, kind_and_branches) -> tuple[list[Block], list[Stage]]:
    """Blocks and stages of a model whose stages each hold ``downsample`` and ``blocks``."""
    blocks, stages = [], []
    for s, stage in enumerate(getattr(model, stages_attr)):
        width, first = model.feature_info[s]["num_chs"], len(blocks)
        for j, block in enumerate(stage.blocks):
            kind, branches = kind_and_branches(block)
            blocks.append(Block(f"{stages_attr}.{s}.blocks.{j}", s, kind, width, branches))
        downsample = None if isinstance(stage.downsample, nn.Identity) else f"{stages_attr}.{s}.downsample"
        stages.append(Stage(s, downsample, tuple(range(first, len(blocks))), width))
    return blocks, stages


@register_family("vit", VisionTransformer)
def describe_vit(model: VisionTransformer) -> Anatomy:
    """ViT/DeiT: one stage of pre-norm blocks on a token sequence with prefix tokens."""
    blocks = tuple(
        Block(f"blocks.{i}", 0, "transformer", model.embed_dim, TRANSFORMER_BRANCHES_VIT)
        for i in range(len(model.blocks))
    )
    stage = Stage(0, None, tuple(range(len(blocks))), model.embed_dim)
    return Anatomy(
        family="vit",
        layout="tokens",
        num_prefix_tokens=model.num_prefix_tokens,
        embed=_present(model, ("patch_embed", "norm_pre")),
        blocks=blocks,
        stages=(stage,),
        final=_present(model, ("norm", "fc_norm")),
        classifier=_classifier(model),
        patch_size=model.patch_embed.patch_size[0],
        extra={"position_embedding": "pos_embed"},
    )


@register_family("swin", SwinTransformer)
def describe_swin(model: SwinTransformer) -> Anatomy:
    """Swin: hierarchical stages on an NHWC grid; PatchMerging opens stages 1..n."""
    blocks, stages = _staged_blocks(model, "layers", lambda block: ("transformer", TRANSFORMER_BRANCHES_SWIN))
    return Anatomy(
        family="swin",
        layout="nhwc",
        num_prefix_tokens=0,
        embed=("patch_embed",),
        blocks=tuple(blocks),
        stages=tuple(stages),
        final=("norm",),
        classifier=_classifier(model),
        patch_size=model.patch_embed.patch_size[0],
    )


@register_family("convnext", ConvNeXt)
def describe_convnext(model: ConvNeXt) -> Anatomy:
    """ConvNeXt: NCHW stages; each block has one residual branch (dw-conv, norm, MLP)."""
    main_branch = ("conv_dw", "norm", "mlp", "ls", "drop_path")
    blocks, stages = _staged_blocks(model, "stages", lambda block: ("convnext", {"main": _present(block, main_branch)}))
    return Anatomy(
        family="convnext",
        layout="nchw",
        num_prefix_tokens=0,
        embed=("stem",),
        blocks=tuple(blocks),
        stages=tuple(stages),
        final=("norm_pre", "head.norm") if hasattr(model.head, "norm") else ("norm_pre",),
        classifier=_classifier(model),
        patch_size=model.feature_info[0]["reduction"],
    )


def _mbconv_width(block: nn.Module) -> int:
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return last_bn.num_features


@register_family("efficientnet", EfficientNet)
def describe_efficientnet(model: EfficientNet) -> Anatomy:
    """EfficientNet/MobileNet-style: NCHW stages of (inverted-)residual blocks.

    Downsampling happens inside the first block of a stage (a strided depth-wise
    convolution), so stages have no separate downsample module; ``extra["strided"]``
    lists the indices of the blocks that change resolution.
    """
    blocks, stages, strided = [], [], []
    for s, stage in enumerate(model.blocks):
        first = len(blocks)
        for j, block in enumerate(stage):
            order = ("conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3", "drop_path")
            if not hasattr(block, "conv_pwl"):  # depth-wise separable block
                order = ("conv_dw", "bn1", "aa", "se", "conv_pw", "bn2", "drop_path")
            kind = "residual" if getattr(block, "has_skip", False) else "plain"
            blocks.append(Block(f"blocks.{s}.{j}", s, kind, _mbconv_width(block), {"main": _present(block, order)}))
            if block.conv_dw.stride[0] > 1:
                strided.append(len(blocks) - 1)
        stages.append(Stage(s, None, tuple(range(first, len(blocks))), _mbconv_width(stage[-1])))
    return Anatomy(
        family="efficientnet",
        layout="nchw",
        num_prefix_tokens=0,
        embed=("conv_stem", "bn1"),
        blocks=tuple(blocks),
        stages=tuple(stages),
        final=("conv_head", "bn2"),
        classifier=_classifier(model),
        patch_size=model.conv_stem.stride[0],
        extra={"strided": tuple(strided)},
    )
