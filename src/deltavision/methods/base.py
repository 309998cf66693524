"""What a tuning method is: its spec, the contract every method module fulfils.

A method module holds a config dataclass (its options, typed) and
``apply(model, anatomy, config)``, which freezes nothing itself (the caller
froze the backbone) and either changes ``model`` in place and returns None,
or returns a wrapper module that owns ``model`` (a method with a forward of
its own, such as E3VA). A method that folds into the backbone also has
``merge(model, anatomy)``, returning the plain timm model.

Methods attach inside the backbone in one of two ways only: wrapping leaf
modules (SSF, LoRA) or adding modules at the block taps
(:mod:`deltavision.anatomy.taps`: Mona, Houlsby, AdaptFormer, VPT-deep).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class MethodSpec:
    """A registered method and every capability callers may ask about.

    - ``families``: the backbone families it fits (None: every family the anatomy knows);
    - ``structure_free``: needs no anatomy, so it fits any timm model (full, linear, bitfit, norm);
    - ``shares_backbone``: trains only tensors of its own, so several tasks can share one frozen backbone;
    - ``batch_stats``: BatchNorms whose affine trains also re-estimate their running statistics
      (methods that train whole layers); the others adapt features the frozen statistics describe;
    - ``default_lr``: the AdamW step that suits it under the default budget;
    - ``owns``: the name fragment that marks the tensors it adds (empty: it adds none);
    - ``backprops_backbone``: gradients flow back through the backbone (False for E3VA and linear
      probing, whose backbone runs without autograd's bookkeeping for it);
    - ``merge``: folds it into the backbone's weights (None: it cannot be folded).
    """

    name: str
    config_cls: type
    apply: Callable[[nn.Module, Any, Any], nn.Module | None]
    summary: str
    merge: Callable[[nn.Module, Any], nn.Module | None] | None = None
    families: frozenset[str] | None = None
    structure_free: bool = False
    shares_backbone: bool = True
    batch_stats: bool = False
    default_lr: float = 1e-2
    owns: str = ""
    backprops_backbone: bool = True

    @property
    def folds(self) -> bool:
        return self.merge is not None

    def fits(self, family: str | None) -> bool:
        """Whether the method applies to a backbone of ``family`` (None: a family the anatomy does not know)."""
        if family is None:
            return self.structure_free
        return self.families is None or family in self.families

    def misfit(self, family: str | None, backbone: str) -> str | None:
        """Why the method does not fit ``backbone`` of ``family``; None if it does."""
        if self.fits(family):
            return None
        if family is None:
            from ..anatomy import supported_families

            return (
                f"method {self.name!r} needs a backbone family deltavision knows ({', '.join(supported_families())}); "
                f"{backbone} is not one"
            )
        return f"method {self.name!r} supports {', '.join(sorted(self.families))} backbones, not {family} ({backbone})"
