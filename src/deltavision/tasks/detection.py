"""Object detection and instance segmentation: torchvision's detectors around an adapted backbone.

The detector is torchvision's own (``FasterRCNN``, ``RetinaNet``, ``MaskRCNN``
with their anchor generators, box coders, NMS and RoI ops); only its backbone
is ours: :class:`PyramidBackbone` runs the adapted model
(:func:`~.features.feature_maps`: E3VA's highway, VPT without prompts, any
other method's stage outputs), the neck (:class:`~.features.FeaturePyramid`,
a simple pyramid for plain ViT) and a ``torchvision.ops.FeaturePyramidNetwork``.

Conventions are torchvision's: images are float RGB in [0, 1] (the detector
normalises them with the backbone's mean and std), targets are dicts with
``boxes`` (xyxy pixels), ``labels`` (int64, 0 is background and never a
target) and for ``instance`` ``masks`` (K x H x W uint8); ``num_classes``
counts the background. Every image is resized to ``image_size`` x
``image_size`` (the size it trains at, never torchvision's 800 px) and the
predictions are mapped back to the image's own size.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..errors import MethodOptionError
from ..methods.wrapper import BackboneWrapper
from .features import FeaturePyramid, feature_maps, native_image_size, probe_feature_maps

DETECTORS = {"detection": ("fasterrcnn", "retinanet"), "instance": ("maskrcnn",)}
FPN_CHANNELS = 256
REPRESENTATION_SIZE = 1024  # torchvision's TwoMLPHead width
HEAD_OPTIONS = ("image_size", "fpn_channels")


def check_detector(task: str, detector: str | None) -> str:
    """The detector of ``task`` (its first one by default); an unknown name is a MethodOptionError."""
    choices = DETECTORS[task]
    detector = detector or choices[0]
    if detector not in choices:
        raise MethodOptionError(f"unknown {task} detector {detector!r}; choose one of {', '.join(choices)}")
    return detector


def check_head_options(options: dict | None) -> dict:
    """``{"image_size": int, "fpn_channels": int}`` with unknown keys and bad values refused."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(HEAD_OPTIONS))
    if unknown:
        raise MethodOptionError(f"unknown detector option(s) {', '.join(unknown)}; known: {', '.join(HEAD_OPTIONS)}")
    for key, value in options.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MethodOptionError(f"detector option {key} must be a positive integer, not {value!r}")
    return options


class PyramidBackbone(nn.Module):
    """The adapted model's stage maps as an ``OrderedDict`` of FPN levels (torchvision's backbone contract).

    Children: ``body`` (the adapted model), ``neck`` (:class:`FeaturePyramid`),
    ``norms`` (a trainable LayerNorm per level, as mmdet's Swin and ViTDet
    put on their outputs: raw stage outputs of CNNs reach a standard deviation of
    10 and more, which gives Mask R-CNN first mask losses above 10; identities
    when the body's maps end in its own norms, as E3VA's) and ``fpn``;
    ``out_channels`` is the FPN width. ``retina``: the three
    coarsest levels plus P6/P7 (strides 8-128, as RetinaNet); otherwise four
    levels plus a max-pooled one (strides 4-64, as Faster/Mask R-CNN).
    """

    def __init__(self, body: nn.Module, image_size: int, out_channels: int = FPN_CHANNELS, retina: bool = False):
        super().__init__()
        self.body = body
        channels, strides = probe_feature_maps(body, image_size)
        self.neck = FeaturePyramid(channels, strides)
        if retina:
            self.neck.drop_finest()
        if isinstance(body, BackboneWrapper):
            body.use_stages(self.neck.picked)
        normalized = getattr(body, "normalizes_features", False)
        self.norms = nn.ModuleList(nn.Identity() if normalized else LayerNorm2d(c) for c in self.neck.channels)
        extra = LastLevelP6P7(out_channels, out_channels) if retina else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(self.neck.channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        last = self.neck.strides[-1]
        self.strides = [*self.neck.strides, *([last * 2, last * 4] if retina else [last * 2])]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        levels = self.neck(feature_maps(self.body, images))
        return self.fpn(OrderedDict((str(i), norm(level)) for i, (norm, level) in enumerate(zip(self.norms, levels))))


def rcnn_anchors(strides: list[int]) -> AnchorGenerator:
    """One anchor size per level, 8x its stride (torchvision's 32-512 px at strides 4-64), three aspect ratios."""
    return AnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))


def retina_anchors(strides: list[int]) -> AnchorGenerator:
    """Three octave scales of 4x the stride per level (torchvision's RetinaNet: 32-512 px at strides 8-128)."""
    sizes = tuple(tuple(int(4 * s * 2 ** (k / 3)) for k in range(3)) for s in strides)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))


def proposal_budget(image_size: int) -> dict[str, int]:
    """R-CNN proposal and RoI-sample counts scaled to the image area (torchvision's own at 800 px).

    torchvision keeps 2000/1000 proposals (train/test) and samples 512 RoIs
    per image for 800 px COCO images; a 128 px image holds 39x fewer
    anchors, so the same counts would be mostly duplicates and cost most of the step.
    """
    area = min(1.0, (image_size / 800) ** 2)
    train, test = max(300, round(2000 * area)), max(300, round(1000 * area))
    return dict(rpn_pre_nms_top_n_train=train, rpn_post_nms_top_n_train=train, rpn_pre_nms_top_n_test=test,
                rpn_post_nms_top_n_test=test, box_batch_size_per_image=max(128, round(512 * area)))


def build_detector(adapted: nn.Module, num_classes: int, detector: str, head_options: dict | None = None) -> nn.Module:
    """torchvision's ``detector`` ("fasterrcnn", "retinanet", "maskrcnn") on the adapted model.

    ``num_classes`` counts the background (class 0). ``head_options``:
    ``image_size`` (default: the backbone's own input size) and
    ``fpn_channels`` (default 256). Proposal counts follow :func:`proposal_budget`.
    """
    options = check_head_options(head_options)
    size = options.get("image_size") or native_image_size(adapted)
    width = options.get("fpn_channels", FPN_CHANNELS)
    backbone = PyramidBackbone(adapted, size, width, retina=detector == "retinanet")
    cfg = adapted.pretrained_cfg
    common = dict(
        min_size=size, max_size=size, fixed_size=(size, size), size_divisible=1,
        image_mean=list(cfg.get("mean", (0.485, 0.456, 0.406))), image_std=list(cfg.get("std", (0.229, 0.224, 0.225))),
    )
    if detector == "retinanet":
        return RetinaNet(backbone, num_classes, anchor_generator=retina_anchors(backbone.strides), **common)
    anchors = rcnn_anchors(backbone.strides)
    common |= proposal_budget(size)
    box_head = TwoMLPHead(width * 7 * 7, REPRESENTATION_SIZE)
    if detector == "fasterrcnn":
        return FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, box_head=box_head, **common)
    return MaskRCNN(  # with its own mask predictor, torchvision wants the box predictor given too
        backbone, None, rpn_anchor_generator=anchors, box_head=box_head,
        box_predictor=FastRCNNPredictor(REPRESENTATION_SIZE, num_classes), mask_head=MaskRCNNHeads(width, (width,) * 4, 1), mask_predictor=MaskRCNNPredictor(width, width, num_classes),
        **common,
    )
