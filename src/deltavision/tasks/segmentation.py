"""Semantic segmentation on an adapted backbone: multi-scale features, a decoder, per-pixel logits.

The backbone is ours (adapted, frozen where its method says); the neck
(:class:`~.features.FeaturePyramid`) and the decoder always train. Decoders
come from segmentation-models-pytorch: UPerNet (Xiao et al., ECCV 2018; the
head Mona and E3VA use on ADE20K, their Sec. 4) and the lighter FPN
(Kirillov et al., "Panoptic FPN", CVPR 2019).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MethodOptionError
from ..methods.wrapper import BackboneWrapper
from .features import FeaturePyramid, feature_maps, probe_feature_maps

HEADS = ("upernet", "fpn")
DEFAULT_HEAD = "upernet"
DECODER_CHANNELS = 256


def _decoder(head: str, channels: list[int]) -> tuple[nn.Module, int]:
    """(smp decoder over four maps, its output width). smp lists strides 1 and 2 first; we have none."""
    from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
    from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

    if head == "upernet":
        return UPerNetDecoder([0, 0, *channels], encoder_depth=5, decoder_channels=DECODER_CHANNELS), DECODER_CHANNELS
    decoder = FPNDecoder(channels, encoder_depth=3, pyramid_channels=DECODER_CHANNELS, segmentation_channels=128,
                         dropout=0.0)
    return decoder, decoder.out_channels


def check_head(head: str | None) -> str:
    head = head or DEFAULT_HEAD
    if head not in HEADS:
        raise MethodOptionError(f"unknown segmentation head {head!r}; choose one of {', '.join(HEADS)}")
    return head


class SegmentationModel(nn.Module):
    """``forward(images (B, 3, H, W)) -> logits (B, num_classes, H, W)`` at the input resolution.

    Children: ``backbone`` (the adapted model), ``neck``, ``decoder``,
    ``classifier`` (dropout 0.1 and a 1x1 convolution, as mmseg's decode heads).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = DEFAULT_HEAD):
        super().__init__()
        self.head_name = check_head(head)
        self.backbone = backbone
        channels, strides = probe_feature_maps(backbone)
        self.neck = FeaturePyramid(channels, strides)
        if isinstance(backbone, BackboneWrapper):
            backbone.use_stages(self.neck.picked)
        self.decoder, width = _decoder(self.head_name, self.neck.channels)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(width, num_classes, kernel_size=1))
        self.num_classes = num_classes

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        levels = self.neck(feature_maps(self.backbone, images))
        decoded = self.decoder([None, None, *levels] if self.head_name == "upernet" else levels)
        logits = self.classifier(decoded)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
