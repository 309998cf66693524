"""Atomic, pickle-free file I/O: safetensors for tensors, JSON for configs."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from .errors import AdapterFileError, ArtifactExistsError, DeltaVisionError


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename.

    The file gets the permissions the umask allows (as ``open`` would give), and
    any failure (disk full, read-only folder, a safetensors write error) leaves
    no temporary file and raises :class:`DeltaVisionError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise DeltaVisionError(f"could not write {path}: {err.strerror or err}") from err
    try:
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        Path(tmp).unlink(missing_ok=True)
        raise DeltaVisionError(f"could not write {path}: {getattr(err, 'strerror', None) or err}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ensure_writable_dir(folder: Path) -> None:
    """Create ``folder`` if needed and check a file can be written in it, or raise DeltaVisionError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise DeltaVisionError(f"cannot write to {folder}: {err.strerror or err}") from err


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(clean, tmp, metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file into memory (no mapping of the file stays behind, so it can be
    replaced or deleted and its disk space freed); a missing or corrupt file gives AdapterFileError."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path} does not exist")
    try:
        return load(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({err})") from err


def save_json(data: dict[str, Any], path: Path) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def load_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} should hold a JSON object")
    return data


def refuse_overwrite(path: Path, overwrite: bool) -> None:
    """Raise unless `path` is free or overwriting was asked for."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ArtifactExistsError(f"{path} already exists; pass --overwrite to replace it")
