"""Adapters on the Hugging Face Hub: fetch one by ``hf-hub:org/name[@revision]``, publish one with a model card.

:func:`resolve_adapter` is the one place an adapter source becomes a local
folder: a path stays a path; a hub id is downloaded (only the adapter's two
files) into the Hugging Face cache, or found there when offline.
:func:`push_adapter` uploads an adapter folder, the run's ``log.csv`` and
``curves.png`` when they sit next to it, and a generated ``README.md``.
huggingface_hub (and timm, for the card) are imported only when used: the
MIST edge side reads local adapter folders without them.
"""

from __future__ import annotations

import csv
import importlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..defaults import VERSION
from ..errors import HubError
from .state import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LEGACY_CONFIG, LEGACY_WEIGHTS

HUB_PREFIX = "hf-hub:"
ADAPTER_PATTERNS = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, LEGACY_CONFIG, LEGACY_WEIGHTS]
RUN_FILES = ("log.csv", "curves.png")  # what `deltavision train` writes next to adapter/ (train.loop.LOG, PLOT)
CARD = "README.md"
MAX_CARD_EPOCHS = 50
MAX_CARD_CLASSES = 100


def is_hub_id(source: Any) -> bool:
    """Whether ``source`` names an adapter on the hub (``hf-hub:org/name[@revision]``)."""
    return isinstance(source, (str, Path)) and str(source).startswith(HUB_PREFIX)


def parse_hub_id(source: str) -> tuple[str, str | None]:
    """``("org/name", revision or None)`` of ``hf-hub:org/name[@revision]``; HubError if malformed."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, at, revision = str(source)[len(HUB_PREFIX):].partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(f"{source} is not a hub id of the form hf-hub:org/name[@revision] ({_first_line(err)})") from err
    if at and not revision:
        raise HubError(f"{source}: nothing after '@'; give a branch, tag or commit, or drop the '@'")
    return repo_id, revision or None


def resolve_adapter(source: str | Path) -> Path:
    """The local folder of an adapter: ``source`` itself, or its hub snapshot for an ``hf-hub:`` id.

    Only the adapter files are downloaded, into the Hugging Face cache
    (``HF_HUB_CACHE`` or ``HF_HOME``; the token is the usual ``HF_TOKEN`` or
    ``hf auth login``). Offline (``HF_HUB_OFFLINE=1`` or no network) the cached
    copy is used; with none, :class:`HubError` says so at once.
    """
    if not is_hub_id(source):
        return Path(source)
    repo_id, revision = parse_hub_id(str(source))
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ADAPTER_PATTERNS))
    except LocalEntryNotFoundError as err:
        why = "offline (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise HubError(f"cannot download {source}: {why} and it is not in the local cache ({constants.HF_HUB_CACHE})") from err
    except GatedRepoError as err:
        raise HubError(f"{source} is gated: accept its terms on the hub, then log in (hf auth login or HF_TOKEN)") from err
    except RepositoryNotFoundError as err:
        raise HubError(f"{source}: no such repository on the hub, or it is private and you are not logged in "
                       "(hf auth login or HF_TOKEN)") from err
    except RevisionNotFoundError as err:
        raise HubError(f"{source}: the repository has no revision {revision!r}") from err
    except _hub_errors() as err:
        raise HubError(f"cannot download {source}: {_first_line(err)}") from err
    if not (folder / ADAPTER_CONFIG).is_file() and not (folder / LEGACY_CONFIG).is_file():
        raise HubError(f"{source} holds no {ADAPTER_CONFIG}: it is not a deltavision adapter")
    return folder


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What hub calls raise for refused, unreachable or invalid requests, the HTTP client's own errors included."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    for client in ("httpx2", "httpx", "requests"):  # huggingface_hub 2.x, 1.x, 0.x
        try:
            module = importlib.import_module(client)
        except ImportError:
            continue
        errors.append(getattr(module, "HTTPError", getattr(module, "RequestException", OSError)))
    return tuple(errors)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# --- publishing ------------------------------------------------------------------------------------


def push_adapter(
    adapter: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload an adapter folder with a generated model card to hub repository ``repo_id``; return its URL.

    The folder must load (its tensors fit the model its config describes).
    The run's ``log.csv`` and ``curves.png`` are uploaded too when they sit
    next to the folder. The repository is created if needed.
    """
    from huggingface_hub import HfApi

    if is_hub_id(adapter):
        raise HubError(f"push takes a local adapter folder, not {adapter}")
    if parse_hub_id(HUB_PREFIX + repo_id)[1] is not None:
        raise HubError(f"the repository is org/name, not {repo_id}; a branch goes in revision (--revision)")
    folder = Path(adapter)
    config, counts = _checked_adapter(folder)
    run_files = [folder.parent / name for name in RUN_FILES if (folder.parent / name).is_file()]
    with tempfile.TemporaryDirectory(prefix="deltavision-push-") as staging:
        staged = _stage(folder, run_files, Path(staging))
        (staged / CARD).write_text(model_card(config, counts, repo_id, staged))
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=staged, revision=revision,
                commit_message=commit_message or f"Upload {config['method']} adapter for {config['backbone']}",
            )
        except _hub_errors() as err:
            raise HubError(f"could not push to {repo_id}: {_first_line(err)} (log in with hf auth login or set HF_TOKEN)") from err
    return str(getattr(commit, "commit_url", None) or commit)


def _checked_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The adapter's config and parameter counts; its tensors are loaded into the model it describes
    (random-init backbone: no weights download), so an adapter that does not load is not published."""
    from .build import create_model
    from .state import count_parameters, load_adapter, read_adapter_config

    config = read_adapter_config(folder)
    model = create_model(
        config["backbone"], config["method"], config["num_classes"], pretrained=False,
        backbone_options=config.get("backbone_options") or None, **config.get("options", {}),
    )
    load_adapter(folder, model)
    return config, count_parameters(model)


def _stage(folder: Path, run_files: list[Path], staging: Path) -> Path:
    """Copy what is uploaded into ``staging``: the adapter under today's file names, and the run files."""
    from .state import adapter_files

    weights, config = adapter_files(folder)
    shutil.copyfile(weights, staging / ADAPTER_WEIGHTS)
    shutil.copyfile(config, staging / ADAPTER_CONFIG)
    for path in run_files:
        shutil.copyfile(path, staging / path.name)
    return staging


def model_card(config: dict[str, Any], counts: dict[str, int], repo_id: str, folder: Path) -> str:
    """The README.md of a published adapter: hub metadata, what it is, how well it did, how to load it.

    ``folder`` is what gets uploaded; its ``log.csv`` and ``curves.png`` (if
    there) feed the metrics table and the plot.
    """
    from huggingface_hub import ModelCardData

    run = config.get("run") or {}
    log = _read_log(folder / "log.csv")
    sections = [
        f"# {repo_id.split('/')[-1]}",
        _summary_text(config),
        _facts_table(config, counts),
        _loading_text(config, repo_id, run),
        _metrics_text(log, (folder / "curves.png").is_file()),
        _training_text(config, run),
        _classes_text(config.get("classes") or []),
    ]
    metadata = ModelCardData(
        library_name="deltavision", pipeline_tag="image-classification", base_model=_base_model(config, run),
        tags=["deltavision", "image-classification", "timm", "peft", config["method"]],
    )
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def _summary_text(config: dict[str, Any]) -> str:
    return (
        f"A **{config['method']}** adapter for the timm backbone `{config['backbone']}` with a "
        f"{config['num_classes']}-class head, trained with "
        f"deltavision {config.get('deltavision_version', VERSION)}. "
        "The repository holds only the trained tensors (`deltavision.safetensors`) and their config "
        "(`deltavision.json`); the backbone's own weights come from timm."
    )


def _facts_table(config: dict[str, Any], counts: dict[str, int]) -> str:
    share = 100.0 * counts["trainable"] / counts["total"]
    rows = [
        ("backbone", f"`{config['backbone']}`"),
        ("method", f"`{config['method']}`"),
        ("method options", _options_text(config.get("options"))),
        ("backbone options", _options_text(config.get("backbone_options"))),
        ("classes", str(config["num_classes"])),
        ("trainable parameters", f"{counts['trainable']:,} of {counts['total']:,} ({share:.3f}%)"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)


def _options_text(options: dict[str, Any] | None) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in sorted((options or {}).items())) or "defaults"


def _loading_text(config: dict[str, Any], repo_id: str, run: dict[str, Any]) -> str:
    """The Python snippet that loads this adapter (rebuilding the backbone the way the run had it) and
    the CLI commands that take it."""
    hub_id = HUB_PREFIX + repo_id
    arguments = [repr(hub_id)]
    note = ""
    if run.get("checkpoint"):
        arguments.append('checkpoint="backbone.safetensors"')
        note = "  # the run started from local backbone weights: pass your copy of them"
    elif run.get("pretrained") is False:
        arguments.append("pretrained=False")
        note = "  # the run trained on a seeded random-init backbone, which this rebuilds"
    data = config.get("data") or {}
    size = int(data.get("image_size") or 224)
    snippet = (
        "```python\nimport torch\nimport deltavision as dv\n\n"
        f"model = dv.load_adapter({', '.join(arguments)}).eval(){note}\n"
        f"with torch.no_grad():\n    logits = model(torch.randn(1, 3, {size}, {size}))  # a batch of images\n```"
    )
    inputs = f"Inputs are {size} x {size} RGB images"
    if data.get("mean") and data.get("std"):
        inputs += f" scaled to [0, 1] and normalised with mean {_floats(data['mean'])} and std {_floats(data['std'])}"
    merge = (f"deltavision merge {hub_id} --out model.safetensors   # plain timm weights\n"
             if _folds(config["method"]) else "")
    commands = (
        f"```bash\ndeltavision eval {hub_id} --data path/to/images\n{merge}"
        f"deltavision export {hub_id} --format onnx --out model.onnx\n```"
    )
    return f"## Use it\n\n`pip install deltavision`, then\n\n{snippet}\n\n{inputs}.\n\n{commands}"


def _floats(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _folds(method: str) -> bool:
    from ..methods import get_method

    return get_method(method).folds


def _read_log(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


LOG_COLUMNS = (("epoch", "epoch", "{:.0f}"), ("train_loss", "train loss", "{:.4f}"), ("val_loss", "val loss", "{:.4f}"),
               ("top1", "top-1 %", "{:.2f}"), ("top5", "top-5 %", "{:.2f}"), ("lr", "learning rate", "{:.3g}"))


def _metrics_text(log: list[dict[str, str]], has_curves: bool) -> str:
    if not log:
        return ""
    last = log[-1]
    headline = (f"After {int(float(last['epoch']))} epochs: top-1 **{float(last['top1']):.2f}%**, "
                f"top-5 {float(last['top5']):.2f}% on the run's validation split.")
    columns = [c for c in LOG_COLUMNS if c[0] in last]
    table = "| " + " | ".join(c[1] for c in columns) + " |\n|" + "---|" * len(columns)
    shown = log[-MAX_CARD_EPOCHS:]
    for row in shown:
        table += "\n| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns) + " |"
    more = f"\n\n(the last {len(shown)} of {len(log)} epochs; all in `log.csv`)" if len(shown) < len(log) else ""
    curves = "\n\n![training curves](curves.png)" if has_curves else ""
    return f"## Results\n\n{headline}\n\n{table}{more}{curves}"


def _cell(value: str | None, fmt: str) -> str:
    try:
        return fmt.format(float(value))
    except (TypeError, ValueError):
        return value or ""


def _training_text(config: dict[str, Any], run: dict[str, Any]) -> str:
    train = run.get("train") or {}
    source = config.get("source") or run.get("data")
    settings = [
        ("data", Path(source).name if source else None), ("image size", run.get("image_size")),
        ("augmentation", run.get("augment")), ("epochs", train.get("epochs")), ("batch size", train.get("batch_size")),
        ("learning rate", train.get("lr")), ("weight decay", train.get("weight_decay")),
        ("warm-up epochs", train.get("warmup_epochs")), ("label smoothing", train.get("label_smoothing")),
        ("precision", train.get("precision")), ("seed", train.get("seed", config.get("seed"))),
        ("pretrained backbone", run.get("pretrained")),
    ]
    shown = [(k, v) for k, v in settings if v is not None]
    if not shown:
        return ""
    return "## Training\n\n" + "\n".join(f"- {key}: {value}" for key, value in shown) + \
        "\n\nAll settings are in `deltavision.json` (`run`)."


def _classes_text(classes: list[str]) -> str:
    if not classes:
        return ""
    shown = ", ".join(f"`{c}`" for c in classes[:MAX_CARD_CLASSES])
    more = f" and {len(classes) - MAX_CARD_CLASSES} more" if len(classes) > MAX_CARD_CLASSES else ""
    return f"## Classes\n\nOutput index order: {shown}{more}."


def _base_model(config: dict[str, Any], run: dict[str, Any]) -> str | None:
    """The hub repository of the pretrained backbone weights (timm's), if the run started from them."""
    if run.get("pretrained") is False or run.get("checkpoint"):
        return None
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(config["backbone"])
    except (RuntimeError, ValueError, KeyError):
        return None
    return getattr(cfg, "hf_hub_id", None) or None
