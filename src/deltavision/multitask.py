"""Many tasks on one frozen backbone.

Each task is the backbone with its own adapter and head. Task models are
structural copies of one backbone whose parameter and buffer tensors are
shared, not copied, so N tasks cost one backbone plus N adapters. Methods that
add tensors of their own can share it (the adapters, LoRA and SSF left
unmerged, VPT, E3VA); methods that train the backbone's own tensors (full,
bitfit, norm, partial) are refused, and no shared task can be merged.
"""

from __future__ import annotations

import copy
import json
import itertools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import create_backbone
from .errors import AdapterFileError, DeltaVisionError, IncompatibleMethodError
from .methods import get_method, list_methods
from .model import adapt, load_adapter, read_adapter_config, resolve_adapter, save_adapter


class MultiTaskModel(nn.Module):
    """One frozen backbone, named task adapters; ``model(x, task=...)`` or ``activate``."""

    def __init__(self, backbone: str, *, pretrained: bool = True, checkpoint=None, backbone_options=None):
        super().__init__()
        self.backbone_name = backbone
        self.backbone_options = dict(backbone_options or {})
        self.backbone = create_backbone(
            backbone, 0, pretrained=pretrained, checkpoint=checkpoint, options=self.backbone_options
        ).requires_grad_(False)
        self.tasks = nn.ModuleDict()
        self.active: str | None = None

    def _shared_copy(self) -> nn.Module:
        shared = {id(t): t for t in itertools.chain(self.backbone.parameters(), self.backbone.buffers())}
        return copy.deepcopy(self.backbone, memo=dict(shared))

    def _backbone_tensor_ids(self) -> set[int]:
        return {id(t) for t in itertools.chain(self.backbone.parameters(), self.backbone.buffers())}

    def add_task(self, name: str, method: str, num_classes: int, **method_options: Any) -> nn.Module:
        """Attach a new adapter named ``name`` and make it active; return its model."""
        if name in self.tasks:
            raise DeltaVisionError(f"task {name!r} exists already; remove_task it first")
        if not get_method(method).shares_backbone:
            sharing = ", ".join(m for m in list_methods() if get_method(m).shares_backbone)
            raise IncompatibleMethodError(
                f"method {method!r} trains the backbone's own tensors, so tasks cannot share one backbone; "
                f"use one of {sharing}, or separate models"
            )
        model = self._shared_copy()
        model.reset_classifier(num_classes)
        model = adapt(model, self.backbone_name, method, self.backbone_options, **method_options)
        shared = self._backbone_tensor_ids()
        if any(p.requires_grad and id(p) in shared for p in model.parameters()):
            raise AssertionError(f"method {method!r} claims to share the backbone but trains its tensors")
        model.deltavision_shared_backbone = True
        self.tasks[name] = model
        self.active = name
        return model

    def remove_task(self, name: str) -> None:
        del self.tasks[self._task_name(name)]
        if self.active == name:
            self.active = next(iter(self.tasks), None)

    def activate(self, name: str) -> None:
        self.active = self._task_name(name)

    def task(self, name: str | None = None) -> nn.Module:
        return self.tasks[self._task_name(name or self.active)]

    def _task_name(self, name: str | None) -> str:
        if name is None or name not in self.tasks:
            known = ", ".join(self.tasks) or "none yet"
            raise DeltaVisionError(f"no task {name!r}; tasks: {known}")
        return name

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        return self.task(task)(x)

    def save_task(self, name: str, directory: str | Path) -> Path:
        return save_adapter(self.task(name), directory)

    def load_task(self, name: str, directory: str | Path) -> nn.Module:
        """Attach the adapter saved in ``directory`` (for this backbone; or an ``hf-hub:`` id) as task ``name``."""
        directory = resolve_adapter(directory)
        config = read_adapter_config(directory)
        saved_backbone = [config["backbone"], config.get("backbone_options") or {}]
        if saved_backbone != json.loads(json.dumps([self.backbone_name, self.backbone_options])):
            raise AdapterFileError(
                f"adapter {directory} is for backbone {saved_backbone}, this model holds "
                f"{(self.backbone_name, self.backbone_options)}"
            )
        previous = self.active
        model = self.add_task(name, config["method"], config["num_classes"], **config.get("options", {}))
        try:
            return load_adapter(directory, model)
        except Exception:
            del self.tasks[name]
            self.active = previous
            raise

    def memory_report(self) -> dict[str, int]:
        """Bytes held by the shared backbone and by each task's own tensors."""
        shared = self._backbone_tensor_ids()
        report = {"backbone": _bytes(itertools.chain(self.backbone.parameters(), self.backbone.buffers()))}
        for name, model in self.tasks.items():
            own = (t for t in itertools.chain(model.parameters(), model.buffers()) if id(t) not in shared)
            report[name] = _bytes(own)
        return report


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total

