"""SSF: Scaling and Shifting your Features (Lian et al., NeurIPS 2022).

SSF-ADA (Sec. 3.2, Eq. 4) follows every operation of the body with a
per-channel affine map  y = gamma * x + beta,  gamma ~ N(1, std), beta ~ N(0, std)
(Table 6c). Because the map is linear it is re-parameterised into the
preceding operation after training (Eq. 5): for a linear or convolutional
layer W' = diag(gamma) W and b' = gamma * b + beta; for an affine norm
w' = gamma * w and b' = gamma * b + beta. The merged model is the untouched
timm architecture.

Insertion points: every Linear or Conv2d that has a bias and every affine
normalisation layer of the body (embedding, blocks, downsampling layers,
final norm); the classifier is trained directly. On ViT this is the paper's
list (patch embedding, norm1, qkv, proj, norm2, fc1, fc2, final norm); on Swin
it adds each PatchMerging norm; on ConvNeXt the stem, downsample, dw-conv,
norm, fc1, fc2; on EfficientNet and ResNet, whose convolutions have no bias,
every BatchNorm (on EfficientNet between the normalisation and its fused
activation). Where the body overwrites norm outputs in place (ResNet's
in-place ReLU and skip add), the scale-shift keeps its input for backward
instead of its output.
Layers without a bias are skipped: a shift there could not fold without
changing the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import BatchNormAct2d, LayerNorm2d
from torch import nn

from .common import NORM_TYPES, body_named_modules, set_module
from .registry import register_method


@dataclass
class SSFConfig:
    init_std: float = 0.02


class _ScaleShiftFunction(torch.autograd.Function):
    """y = scale * x + shift that keeps y, not x, for backward.

    The next operation (GELU, attention, the next scale-shift) usually keeps y
    anyway, so SSF adds no activation memory of its own; x = (y - shift) / scale
    is recomputed for the scale's gradient (scale starts near 1 and stays away
    from 0 in practice)."""

    @staticmethod
    def forward(ctx, x, scale, shift, channel_dim):
        shape = _broadcast_shape(x.ndim, channel_dim)
        y = torch.addcmul(shift.view(shape), x, scale.view(shape))
        ctx.save_for_backward(y, scale, shift)
        ctx.shape = shape
        return y

    @staticmethod
    def backward(ctx, grad):
        y, scale, shift = ctx.saved_tensors
        shape = ctx.shape
        reduce = [d for d, n in enumerate(shape) if n == 1]
        grad_x = grad * scale.view(shape) if ctx.needs_input_grad[0] else None
        grad_scale = grad_shift = None
        if ctx.needs_input_grad[1]:
            x = (y - shift.view(shape)) / scale.view(shape)
            grad_scale = (grad * x).sum(reduce)
        if ctx.needs_input_grad[2]:
            grad_shift = grad.sum(reduce)
        return grad_x, grad_scale, grad_shift, None


def _broadcast_shape(ndim: int, channel_dim: int) -> list[int]:
    shape = [1] * ndim
    shape[channel_dim] = -1
    return shape


class ScaleShift(nn.Module):
    """Per-channel gamma * x + beta on the channel axis ``channel_dim``.

    ``keep_output``: keep y for backward (see :class:`_ScaleShiftFunction`); off where the
    next operation may overwrite y in place.
    """

    def __init__(self, channels: int, channel_dim: int, init_std: float, keep_output: bool = True):
        super().__init__()
        self.channel_dim = channel_dim
        self.keep_output = keep_output
        self.scale = nn.Parameter(torch.empty(channels).normal_(1.0, init_std))
        self.shift = nn.Parameter(torch.empty(channels).normal_(0.0, init_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_output:
            return _ScaleShiftFunction.apply(x, self.scale, self.shift, self.channel_dim)
        shape = _broadcast_shape(x.ndim, self.channel_dim)
        return torch.addcmul(self.shift.view(shape), x, self.scale.view(shape))


class SSFWrapped(nn.Module):
    """``op`` followed by SSF-ADA. ``fold_into_parent``: the op is a norm-act's inner slot."""

    def __init__(
        self, op: nn.Module, channels: int, channel_dim: int, init_std: float, fold_into_parent=False,
        keep_output=True,
    ):
        super().__init__()
        self.op = op
        self.ssf = ScaleShift(channels, channel_dim, init_std, keep_output)
        self.fold_into_parent = fold_into_parent
        self.act_was_inplace = False

    def forward(self, *args, **kwargs):
        return self.ssf(self.op(*args, **kwargs))


def _channel_dim(module: nn.Module) -> int:
    if isinstance(module, (nn.Conv2d, LayerNorm2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        return 1
    return -1


def _foldable_channels(module: nn.Module) -> int | None:
    """Output channels if SSF after ``module`` folds into it exactly, else None."""
    if isinstance(module, nn.Linear) and module.bias is not None:
        return module.out_features
    if isinstance(module, nn.Conv2d) and module.bias is not None:
        return module.out_channels
    if isinstance(module, NORM_TYPES) and getattr(module, "weight", None) is not None:
        if getattr(module, "bias", None) is not None:
            return module.weight.shape[0]
    return None


def ssf_targets(model: nn.Module, anatomy) -> list[tuple[str, int, int]]:
    """(module name, channels, channel axis) for every insertion point of the body."""
    targets = []
    for name, module in body_named_modules(model, anatomy):
        channels = _foldable_channels(module)
        if channels is not None:
            targets.append((name, channels, _channel_dim(module)))
    return targets


def _merge_ssf(model: nn.Module, anatomy) -> None:
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, SSFWrapped)]
    for name, wrapper in wrapped:
        target = model.get_submodule(name.rpartition(".")[0]) if wrapper.fold_into_parent else wrapper.op
        fold_scale_shift(target, wrapper.ssf.scale.detach(), wrapper.ssf.shift.detach())
        if wrapper.act_was_inplace:
            target.act.inplace = True
        set_module(model, name, wrapper.op)


@torch.no_grad()
def fold_scale_shift(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Eq. 5: absorb y = scale * f(x) + shift into f's weight and bias."""
    weight_shape = [-1] + [1] * (module.weight.ndim - 1)
    module.weight.mul_(scale.view(weight_shape))
    module.bias.mul_(scale).add_(shift)


@register_method("ssf", SSFConfig, "scale and shift after every op; folds into the weights", merge=_merge_ssf, owns="ssf")
def apply_ssf(model: nn.Module, anatomy, config: SSFConfig) -> None:
    for name, channels, channel_dim in ssf_targets(model, anatomy):
        module = model.get_submodule(name)
        if isinstance(module, BatchNormAct2d):
            # Between the normalisation and its fused activation, not after the activation. The
            # activation must not overwrite the scale-shift's output, which backward reuses.
            module.drop = SSFWrapped(module.drop, channels, 1, config.init_std, fold_into_parent=True)
            if getattr(module.act, "inplace", False):
                module.act.inplace = False
                module.drop.act_was_inplace = True
        else:
            wrapped = SSFWrapped(module, channels, channel_dim, config.init_std, keep_output=not anatomy.inplace_after_norm)
            set_module(model, name, wrapped)
