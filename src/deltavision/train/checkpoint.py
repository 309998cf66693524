"""Crash-safe training checkpoints: one safetensors file written atomically.

The file holds the trained tensors (``model.adapter_state_dict``), the
optimizer's state tensors and, in its metadata, the JSON training state
(epoch, step, history). A crash leaves either the previous checkpoint or the
new one, never a torn pair.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import AdapterFileError
from ..io import load_tensors, save_tensors
from ..model import adapter_state_dict, load_adapter_tensors

MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"


def save_checkpoint(path: Path, model, optimizer: torch.optim.Optimizer, state: dict) -> None:
    tensors = {MODEL_PREFIX + k: v for k, v in adapter_state_dict(model).items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value):
                    tensors[f"{OPTIM_PREFIX}{names[id(param)]}/{key}"] = value
    save_tensors(tensors, path, metadata={"state": json.dumps(state)})


def load_checkpoint(path: Path, model, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer from ``path``; return the saved training state.

    The tensors are read into memory, so the file is not kept mapped while training
    goes on: the next checkpoint replaces it and its disk space is freed.
    """
    try:
        tensors = load_tensors(path)
        with safe_open(str(path), framework="pt") as handle:
            state = json.loads(handle.metadata()["state"])
    except Exception as err:  # corrupt file, missing metadata
        raise AdapterFileError(f"checkpoint {path} is unreadable ({err}); delete it to start afresh") from err
    model_tensors = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    load_adapter_tensors(model, model_tensors, path)
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key.startswith(OPTIM_PREFIX):
            name, _, slot = key[len(OPTIM_PREFIX) :].rpartition("/")
            param = params[name]
            optimizer.state[param][slot] = value if slot == "step" else value.to(param.device)
    return state
