"""Training modes: which BatchNorms re-estimate their running statistics.

The rule (README, "BatchNorm statistics"): a BatchNorm keeps its pretrained
running statistics unless its affine parameters train *and* the method trains
whole layers (``full``, ``partial``). It is settled once, when a method is
applied, by :func:`keep_statistics`, and it lives in the BatchNorm itself: a
kept BatchNorm stays in eval mode whatever ``train()`` says, so the usual
PyTorch loop (``model.train()``) trains exactly as ``set_train_mode`` does.
Nothing here imports timm.
"""

from __future__ import annotations

from torch import nn

BatchNorm = nn.modules.batchnorm._BatchNorm


class _KeptStatistics:
    """Mixin for a BatchNorm whose running statistics must not change: it is always in eval mode."""

    def train(self, mode: bool = True):
        return super().train(False)


_KEPT_CLASSES: dict[type, type] = {}


def _kept_class(cls: type) -> type:
    if cls not in _KEPT_CLASSES:
        _KEPT_CLASSES[cls] = type(cls.__name__, (_KeptStatistics, cls), {"__module__": cls.__module__})
    return _KEPT_CLASSES[cls]


def keep_statistics(model: nn.Module, batch_stats: bool) -> None:
    """Fix every BatchNorm's running statistics unless it trains and ``batch_stats`` says trained layers
    re-estimate them; a fixed BatchNorm is put in eval mode and stays there through ``model.train()``."""
    for module in model.modules():
        if isinstance(module, BatchNorm):
            trains = any(p.requires_grad for p in module.parameters(recurse=False))
            if batch_stats and trains:
                release(module)
            elif not isinstance(module, _KeptStatistics):
                module.__class__ = _kept_class(type(module))
                module.eval()


def release(module: nn.Module) -> None:
    """Give a fixed BatchNorm back its own class (a merged model is plain timm again)."""
    if isinstance(module, _KeptStatistics):
        module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, _KeptStatistics))


def release_all(model: nn.Module) -> None:
    for module in model.modules():
        release(module)


def updates_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm that re-estimates its running statistics while training."""
    return isinstance(module, BatchNorm) and not isinstance(module, _KeptStatistics) and any(
        p.requires_grad for p in module.parameters(recurse=False)
    )


def set_train_mode(model: nn.Module, training: bool = True) -> nn.Module:
    """``model.train(training)``; kept for callers of earlier versions (the rule now survives ``train()``)."""
    return model.train(training)
