"""Multi-scale feature maps of an adapted backbone, for dense-prediction heads.

:func:`feature_maps` asks the model: a wrapper method (E3VA's highway, VPT's
prompted stream) answers itself, any other adapted timm model answers through
its Family's ``stage_outputs``. :class:`FeaturePyramid` turns those maps into
the four levels (strides 4, 8, 16, 32 for the usual backbones) that UPerNet,
FPN and torchvision's detectors read.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn

from ..anatomy import family_of
from ..errors import IncompatibleMethodError
from ..methods.wrapper import BackboneWrapper

LEVELS = 4


def feature_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """One NCHW map per stage of the adapted ``model`` (prefix and prompt tokens dropped)."""
    if isinstance(model, BackboneWrapper):
        return model.feature_maps(images)
    family = family_of(model)
    if family is None:
        raise IncompatibleMethodError(
            f"dense prediction needs a backbone family deltavision knows, not {type(model).__name__}"
        )
    return family.stage_outputs(model, images)


def native_image_size(model: nn.Module) -> int:
    """The input size a fixed-size backbone was built for (ViT/Swin ``img_size``), else timm's default."""
    model = getattr(model, "backbone", model) if isinstance(model, BackboneWrapper) else model
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed and not getattr(model.patch_embed, "dynamic_img_size", False):
        return int(fixed[-1])
    return int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


@torch.no_grad()
def probe_feature_maps(model: nn.Module, image_size: int | None = None) -> tuple[list[int], list[int]]:
    """(channels, strides) of every stage map, from one blank image in eval mode."""
    size = image_size or native_image_size(model)
    was_training = model.training
    model.eval()
    try:
        first = next(model.parameters())
        maps = feature_maps(model, torch.zeros(1, 3, size, size, device=first.device, dtype=first.dtype))
    finally:
        model.train(was_training)
    return [m.shape[1] for m in maps], [max(1, round(size / m.shape[-2])) for m in maps]


def _upsample(channels: int, times: int) -> nn.Module:
    """``times`` stride-2 transposed convolutions, halving the width each time (ViTDet's simple pyramid)."""
    layers, width = [], channels
    for step in range(times):
        layers.append(nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2))
        width //= 2
        if step + 1 < times:
            layers += [LayerNorm2d(width), nn.GELU()]
    return nn.Sequential(*layers)


class FeaturePyramid(nn.Module):
    """Four maps, finest first, from a backbone's stage maps (the trainable neck of a dense head).

    Hierarchical backbones: the last map of each stride, the finest dropped
    beyond four, missing coarse levels made by stride-2 max pooling (FPN's P6
    rule). A single-map backbone (plain ViT): ViTDet's simple feature pyramid
    (Li et al., 2022, Sec. 3): the map upsampled 4x and 2x by transposed
    convolutions, kept, and max-pooled 2x.
    """

    def __init__(self, channels: list[int], strides: list[int]):
        super().__init__()
        last_of_stride = {stride: i for i, stride in enumerate(strides)}
        self.picked = sorted(last_of_stride.values())[-LEVELS:]
        picked_channels = [channels[i] for i in self.picked]
        self.simple = len(self.picked) == 1
        if self.simple:
            c = picked_channels[0]
            self.resample = nn.ModuleList([_upsample(c, 2), _upsample(c, 1), nn.Identity(), _pool()])
            self.channels = [c // 4, c // 2, c, c]
        else:
            self.resample = nn.ModuleList(_pool() for _ in range(LEVELS - len(self.picked)))
            self.channels = picked_channels + [picked_channels[-1]] * len(self.resample)
        self.strides = self._strides([strides[i] for i in self.picked])

    def _strides(self, picked: list[int]) -> list[int]:
        if self.simple:
            return [max(1, picked[0] // 4), max(1, picked[0] // 2), picked[0], picked[0] * 2]
        return picked + [picked[-1] * 2 ** (i + 1) for i in range(len(self.resample))]

    def drop_finest(self) -> None:
        """Keep the three coarsest levels (RetinaNet reads strides 8-32, not 4)."""
        if self.simple:
            del self.resample[0]
        else:
            self.picked = self.picked[1:]
        self.channels, self.strides = self.channels[1:], self.strides[1:]

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        levels = [maps[i] for i in self.picked]
        if self.simple:
            return [resample(levels[0]) for resample in self.resample]
        for pool in self.resample:
            levels.append(pool(levels[-1]))
        return levels


def _pool() -> nn.Module:
    return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
