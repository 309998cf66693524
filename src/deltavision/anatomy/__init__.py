"""The one place that knows each backbone family's structure.

Methods ask :func:`describe` for an :class:`Anatomy` instead of hard-coding
module names: which modules embed the image, which are the blocks and the
modules on each block's residual branches, where stages begin and what
downsamples between them, which modules finish the body before the
classifier, and how tokens are laid out (prefix tokens, NHWC or NCHW).
"""

from .core import Anatomy, Block, Stage, describe, supported_families

__all__ = ["Anatomy", "Block", "Stage", "describe", "supported_families"]
