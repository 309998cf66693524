"""Using saved adapters: evaluate them and fold them into plain timm weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from .errors import AdapterFileError, DataError
from .io import refuse_overwrite, save_tensors
from .model import load_adapter, merge, read_adapter_config, resolve_adapter
from .tasks.registry import get_task
from .train.device import check_precision, resolve_device
from .train.objectives import objective_for
from .train.run import datasets_for_task


def evaluate_saved_adapter(
    adapter: Path, data: str | None, batch_size: int, val_limit: int | None, checkpoint, pretrained: bool,
    device: str = "cpu", precision: str = "fp32",
) -> dict[str, Any]:
    """Top-1/top-5 of a saved adapter on exactly its run's validation images.

    The split is rebuilt from the run's resolved settings (source, seed,
    validation fraction, limits, input size, normalisation). ``data`` or
    ``val_limit`` other than the run's change what is scored: the result then
    carries a ``warning`` saying how. ``adapter`` may be an ``hf-hub:`` id.
    """
    adapter = resolve_adapter(adapter)
    config = read_adapter_config(adapter)
    run = config.get("run") or _legacy_run_settings(config)
    if not run.get("data") or not config.get("data"):
        raise AdapterFileError(f"{adapter} has no data settings; pass --data and train it with `deltavision train`")
    warnings = []
    source = data or run["data"]
    if source != run["data"]:
        warnings.append(f"scoring on {source}, not the run's data ({run['data']}): these are not its validation images")
    limit = run.get("val_limit") if val_limit is None else val_limit
    if limit != run.get("val_limit"):
        warnings.append(f"--val-limit {val_limit} differs from the run's {run.get('val_limit')}: a different subset")
    data_cfg, task = config["data"], config.get("task", "classification")
    splits = datasets_for_task(
        task, source, data_cfg, val_fraction=run.get("val_fraction", 0.2), train_limit=run.get("train_limit"),
        val_limit=limit, augment=False, seed=run.get("train", {}).get("seed", config.get("seed", 0)),
        data_options=run.get("data_options"),
    )
    if len(splits.classes) != config["num_classes"]:
        raise DataError(
            f"{source} has {len(splits.classes)} classes but the adapter was trained for {config['num_classes']}"
        )
    target = resolve_device(device)
    check_precision(target, precision)
    model = load_adapter(adapter, pretrained=pretrained, checkpoint=checkpoint).to(target)
    objective = objective_for(task, splits.classes)
    loader = DataLoader(splits.val, batch_size=batch_size, collate_fn=objective.collate)
    metrics = objective.evaluate(model, loader, progress=True, device=target, precision=precision)
    return {**metrics, "task": task, "images": len(splits.val), "data": source, "warnings": warnings}


def _legacy_run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What an adapter saved before run settings were recorded says about its split."""
    return {"data": config.get("source"), "val_fraction": 0.2, "train": {"seed": config.get("seed", 0)}}


def merge_saved_adapter(adapter: Path, out: Path, checkpoint, pretrained: bool, overwrite: bool) -> str:
    """Write the folded model's full state dict; return the timm call that loads it."""
    refuse_overwrite(out, overwrite)
    adapter = resolve_adapter(adapter)
    config = read_adapter_config(adapter)
    plain = merge(load_adapter(adapter, pretrained=pretrained, checkpoint=checkpoint))
    save_tensors(plain.state_dict(), out, metadata={"format": "pt"})
    if get_task(config.get("task", "classification")).dense:
        return dense_loading_call(config, out)
    return timm_loading_call(config["backbone"], config["num_classes"], out, config.get("backbone_options"))


def dense_loading_call(config: dict[str, Any], file) -> str:
    """The calls that load a merged dense model: its structure with a plain backbone ("full"), then the weights."""
    options = f", backbone_options={config['backbone_options']!r}" if config.get("backbone_options") else ""
    if config.get("head_options"):
        options += f", head_options={config['head_options']!r}"
    return (
        f"model = deltavision.create_model({config['backbone']!r}, 'full', {config['num_classes']}, "
        f"task={config['task']!r}, head={config['head']!r}, pretrained=False{options}); "
        f"model.load_state_dict(safetensors.torch.load_file({str(file)!r}))"
    )


def timm_loading_call(backbone: str, num_classes: int, file, backbone_options: dict | None = None) -> str:
    """The plain-timm call that loads a merged state dict, on one line.

    ``num_classes`` goes into the overlay as well: without it timm takes the
    pretrained config's class count, sees the head differ, and drops the trained
    classifier for a fresh one.
    """
    options = "".join(f", {k}={v!r}" for k, v in (backbone_options or {}).items())
    return (
        f"timm.create_model({backbone!r}, num_classes={num_classes}{options}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(file)!r}, num_classes={num_classes}))"
    )
