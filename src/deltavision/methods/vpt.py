"""VPT: visual prompt tuning (Jia et al., ECCV 2022, Sec. 3.2, Eq. 4-7).

``num_tokens`` learnable prompt tokens are inserted after the prefix (class,
register) tokens once the patches are embedded (VPT-Shallow); with
``deep=true`` every later block gets its own prompts in their place
(VPT-Deep). Prompts are initialised uniformly in +-sqrt(6 / (3 p^2 + C)), as
Xavier for a patch-sized fan-in.

The method returns a :class:`VPTModel` owning the backbone: the position
embedding is the backbone's own (real prefix only), and the head's average
pooling counts the prompts as prefix tokens, so leaves them out. Backbones
whose stream is a token sequence only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..anatomy import supported_families
from ..anatomy.layout import to_nchw_map
from ..errors import MethodOptionError
from .registry import register_method
from .wrapper import BackboneWrapper


@dataclass
class VPTConfig:
    num_tokens: int = 10
    deep: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if self.num_tokens < 1:
            raise MethodOptionError(f"vpt: num_tokens must be positive, got {self.num_tokens}")


def _prompt(num_tokens: int, channels: int, patch_size: int) -> nn.Parameter:
    bound = math.sqrt(6.0 / (3 * patch_size * patch_size + channels))
    return nn.Parameter(torch.empty(1, num_tokens, channels).uniform_(-bound, bound))


class VPTModel(BackboneWrapper):
    """The frozen ``backbone`` and its ``prompts`` (one set, or one per block when deep).

    forward: the Family's embedding, the prompts inserted after the prefix
    tokens, the blocks (a deep model swaps in block i's prompts before block i),
    and the Family's head with the prompts counted as prefix tokens.
    """

    def __init__(self, backbone: nn.Module, anatomy, config: VPTConfig):
        super().__init__(backbone, anatomy)
        channels, sets = anatomy.blocks[0].width, len(anatomy.blocks) if config.deep else 1
        self.prompts = nn.ParameterList(_prompt(config.num_tokens, channels, anatomy.patch_size) for _ in range(sets))
        self.dropout = nn.Dropout(config.dropout)

    @property
    def num_prefix_tokens(self) -> int:
        """Prefix tokens the blocks see: the backbone's own, then the prompts."""
        return self.anatomy.num_prefix_tokens + self.prompts[0].shape[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.family.head(self.backbone, self._stream(images), num_prefix_tokens=self.num_prefix_tokens)

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The last block's patch tokens as one NCHW map; prompts and prefix tokens dropped."""
        x = self._stream(images)
        grid = self.family.grid(self.backbone, x, tuple(images.shape[-2:]))
        return [to_nchw_map(x, grid)]

    def _stream(self, images: torch.Tensor) -> torch.Tensor:
        x = self.family.embed(self.backbone, images)
        for stage in self.anatomy.stages:
            if stage.downsample:
                x = self.backbone.get_submodule(stage.downsample)(x)
            for index in stage.blocks:
                if index < len(self.prompts):
                    x = self._with_prompts(x, index, replace=index > 0)
                x = self.block(index)(x)
        return x

    def _with_prompts(self, x: torch.Tensor, index: int, replace: bool) -> torch.Tensor:
        """[prefix, prompts ``index``, patches]; ``replace`` drops the prompts ``x`` already holds."""
        start = self.anatomy.num_prefix_tokens
        prompts = self.dropout(self.prompts[index]).expand(x.shape[0], -1, -1)
        rest = start + prompts.shape[1] if replace else start
        return torch.cat([x[:, :start], prompts, x[:, rest:]], dim=1)


@register_method(
    "vpt", VPTConfig, "learnable prompt tokens, shallow or deep (VPT)", families=supported_families(layout="tokens"),
    owns="prompts",
)
def apply_vpt(model: nn.Module, anatomy, config: VPTConfig) -> VPTModel:
    return VPTModel(model, anatomy, config)
