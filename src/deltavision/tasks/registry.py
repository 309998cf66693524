"""The tasks deltavision trains, and what each name implies (no torch, timm or torchvision here).

Code asks the :class:`Task` (``task.dense``, ``task.segments``, ``task.detects``,
``task.masks``) rather than comparing task names.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MethodOptionError

KINDS = ("classification", "segmentation", "detection")


@dataclass(frozen=True)
class Task:
    """One task: its ``kind`` (one of :data:`KINDS`), whether it predicts a mask per
    detected object (``masks``), and the submodule path of the adapted backbone inside
    its model (``adapted_backbone``; "" means the model itself)."""

    name: str
    kind: str
    masks: bool = False
    adapted_backbone: str = ""

    @property
    def dense(self) -> bool:
        """A head over the backbone's stage maps (not the backbone's own classifier)."""
        return self.kind != "classification"

    @property
    def segments(self) -> bool:
        """Per-pixel class logits (semantic segmentation)."""
        return self.kind == "segmentation"

    @property
    def detects(self) -> bool:
        """A torchvision detector: boxes (and masks if ``masks``) per object."""
        return self.kind == "detection"


_REGISTRY = {
    task.name: task
    for task in (
        Task("classification", "classification"),
        Task("segmentation", "segmentation", adapted_backbone="backbone"),
        Task("detection", "detection", adapted_backbone="backbone.body"),
        Task("instance", "detection", masks=True, adapted_backbone="backbone.body"),
    )
}
TASKS = tuple(_REGISTRY)


def get_task(name: str) -> Task:
    """The :class:`Task` called ``name``; an unknown name is a MethodOptionError listing the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise MethodOptionError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
