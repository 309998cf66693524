"""The one place that knows each backbone family's structure.

Methods ask :func:`describe` for an :class:`Anatomy` and :func:`get_family`
for the :class:`Family` that answers family questions (embedding, branches,
head, grids, stage outputs, default LoRA targets), instead of hard-coding
module names. Stream layouts and their conversions live in :mod:`.layout`.
"""

from .core import Anatomy, Block, Stage
from .family import Family, describe, family_of, get_family, register_family, supported_families
from .layout import Grid
from . import families  # noqa: F401,E402  (registers the families)

__all__ = [
    "Anatomy", "Block", "Family", "Grid", "Stage", "describe", "family_of", "get_family", "register_family",
    "supported_families",
]
