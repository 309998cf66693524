"""Commands about methods and saved adapters: methods, params, eval, predict, merge, export, push.

Every command that takes an adapter accepts a folder or a Hugging Face Hub id
(``hf-hub:org/name[@revision]``, fetched once into the hub cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import (
    ADAPTER_HELP, BACKBONE_HELP, BACKBONE_OPT_HELP, CHECKPOINT_HELP, DATA_HELP, DEVICE_HELP, HEAD_HELP, OPT_HELP,
    PRECISION_HELP, TASK_HELP,
    _backbone_options, _options, app, console, err_console,
)

@app.command()
def methods() -> None:
    """List the tuning methods: what each trains, its options (with defaults) and the backbone families it supports."""
    from ..methods import get_method, list_methods

    table = Table("method", "trains", "options", "families", "merges into backbone")
    for name in list_methods():
        spec = get_method(name)
        table.add_row(name, spec.summary, method_options_text(spec), method_families_text(spec), "yes" if spec.folds else "no")
    console.print(table)


def method_options_text(spec) -> str:
    """The method's options as ``key=default``, from its config dataclass ("none" if it has none)."""
    from dataclasses import MISSING, fields

    def shown(f):
        value = f.default if f.default is not MISSING else f.default_factory()
        if value in ((), [], None, ""):
            return "(default)"
        return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)

    return " ".join(f"{f.name}={shown(f)}" for f in fields(spec.config_cls)) or "none"


def method_families_text(spec) -> str:
    """The backbone families a method applies to."""
    from ..anatomy import supported_families

    if spec.structure_free:
        return "any timm model"
    return ", ".join(f for f in supported_families() if spec.fits(f))


@app.command()
def params(
    backbone: str = typer.Option(..., help=BACKBONE_HELP),
    method: str = typer.Option(..., help="Tuning method (see `deltavision methods`)."),
    num_classes: int = typer.Option(..., min=1, help="Classes of the new head."),
    opt: Optional[List[str]] = typer.Option(None, help=OPT_HELP),
    backbone_opt: Optional[List[str]] = typer.Option(None, help=BACKBONE_OPT_HELP),
    task: str = typer.Option("classification", help=TASK_HELP),
    head: Optional[str] = typer.Option(None, help=HEAD_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """Count trainable and total parameters (builds the model with random weights; no download)."""
    from ..model import count_parameters, create_model

    model = create_model(
        backbone, method, num_classes, pretrained=False, backbone_options=_backbone_options(backbone_opt),
        task=task, head=head, **_options(opt),
    )
    counts = count_parameters(model)
    counts["trainable_pct"] = round(100.0 * counts["trainable"] / counts["total"], 4)
    if as_json:
        print(json.dumps({"backbone": backbone, "method": method, "task": task, "num_classes": num_classes, **counts}))
    else:
        console.print(
            f"{backbone} + {method}: {counts['trainable']:,} trainable of {counts['total']:,} "
            f"parameters ({counts['trainable_pct']:.3f}%)"
        )




@app.command("eval")
def evaluate_adapter(
    adapter: str = typer.Argument(..., help=ADAPTER_HELP),
    data: Optional[str] = typer.Option(None, help=DATA_HELP + " [default: the training data]"),
    batch_size: int = typer.Option(64, min=1),
    val_limit: Optional[int] = typer.Option(None, min=1),
    checkpoint: Optional[Path] = typer.Option(None, help=CHECKPOINT_HELP),
    pretrained: bool = typer.Option(True, help="Rebuild the backbone from pretrained weights."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
) -> None:
    """Top-1/top-5 of a trained adapter on exactly its run's validation images (the run's split settings)."""
    from ..inference import evaluate_saved_adapter
    from ..tasks.registry import get_task

    metrics = evaluate_saved_adapter(adapter, data, batch_size, val_limit, checkpoint, pretrained, device, precision)
    for warning in metrics["warnings"]:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    task = get_task(metrics["task"])
    if as_json:
        print(json.dumps(metrics))
    elif task.segments:
        table = Table("class", "IoU (%)")
        for key, value in metrics.items():
            if key.startswith("iou/"):
                table.add_row(key[4:], "absent" if value != value else f"{value:.2f}")
        console.print(table)
        console.print(
            f"mIoU {metrics['miou']:.2f}%, pixel accuracy {metrics['pixel_acc']:.2f}% on {metrics['images']} "
            f"validation images of {metrics['data']}", highlight=False,
        )
    elif task.detects:
        kinds = ("box", "mask") if task.masks else ("box",)
        scores = "; ".join(f"{kind} AP {metrics[f'{kind}_ap']:.2f}, AP50 {metrics[f'{kind}_ap50']:.2f}, "
                           f"AP75 {metrics[f'{kind}_ap75']:.2f}" for kind in kinds)
        console.print(f"{scores} on {metrics['images']} validation images of {metrics['data']}", highlight=False)
    else:
        console.print(
            f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% on {metrics['images']} validation images "
            f"of {metrics['data']}", highlight=False,
        )


@app.command()
def predict(
    adapter: str = typer.Argument(..., help=ADAPTER_HELP),
    images: List[Path] = typer.Argument(..., help="Image files to predict."),
    out: Optional[Path] = typer.Option(
        None, help="Folder for the overlay PNGs (segmentation, detection, instance; required there)."
    ),
    score_threshold: float = typer.Option(0.5, min=0.0, max=1.0, help="Detection: draw boxes scoring at least this."),
    top: int = typer.Option(3, min=1, help="Classification: how many classes to show per image."),
    checkpoint: Optional[Path] = typer.Option(None, help=CHECKPOINT_HELP),
    pretrained: bool = typer.Option(True, help="Rebuild the backbone from pretrained weights."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """Predict image files: the top classes of a classifier, or a PNG per image in --out: a segmentation
    overlay (class colours over the image, with a legend), or detections (boxes, class names, scores, masks)."""
    from ..predict import predict_images

    results = predict_images(adapter, images, out, top=top, pretrained=pretrained, checkpoint=checkpoint,
                             device=device, score_threshold=score_threshold)
    if as_json:
        print(json.dumps(results))
        return
    for result in results:
        if "detections" in result:
            found = ", ".join(f"{d['class']} {d['score']:.2f}" for d in result["detections"]) or "nothing"
            console.print(f"{result['image']}: {result['overlay']} ({found})", highlight=False, soft_wrap=True)
        elif "overlay" in result:
            shares = ", ".join(f"{name} {100 * share:.1f}%" for name, share in result["classes"].items())
            console.print(f"{result['image']}: {result['overlay']} ({shares})", highlight=False, soft_wrap=True)
        else:
            guesses = ", ".join(f"{name} {100 * p:.1f}%" for name, p in result["top"])
            console.print(f"{result['image']}: {guesses}", highlight=False, soft_wrap=True)


@app.command()
def merge(
    adapter: str = typer.Argument(..., help=ADAPTER_HELP + " Its method must fold (ssf, lora and the baselines)."),
    out: Path = typer.Option(..., help="Output .safetensors file of the plain timm model."),
    checkpoint: Optional[Path] = typer.Option(None, help=CHECKPOINT_HELP),
    pretrained: bool = typer.Option(True, help="Rebuild the backbone from pretrained weights."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Fold an adapter into its backbone: a plain timm state dict, loadable without deltavision
    (segmentation: the model with a plain timm backbone, loadable as printed)."""
    from ..inference import merge_saved_adapter

    snippet = merge_saved_adapter(adapter, out, checkpoint, pretrained, overwrite)
    how = "with plain timm" if snippet.startswith("timm.") else "with deltavision (plain timm backbone, no adapter)"
    console.print(f"wrote {out}; load it {how}:\n  {snippet}", soft_wrap=True, highlight=False)


@app.command("export")
def export_model(
    adapter: str = typer.Argument(..., help=ADAPTER_HELP),
    out: Path = typer.Option(..., help="Output file, e.g. model.onnx or model.pt (written atomically)."),
    format: str = typer.Option("onnx", "--format", help="onnx (run it with onnxruntime) or torchscript (torch.jit.load)."),
    image_size: Optional[int] = typer.Option(
        None, min=8, help="Input height and width [default: the run's, else the backbone's]."
    ),
    tolerance: float = typer.Option(
        1e-4, min=0.0, help="Largest logit difference from PyTorch accepted when the written file is checked."
    ),
    checkpoint: Optional[Path] = typer.Option(None, help=CHECKPOINT_HELP),
    pretrained: bool = typer.Option(True, help="Rebuild the backbone from pretrained weights."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Export an adapter's model with a dynamic batch axis: methods that fold (ssf, lora, the baselines) as the
    plain merged timm graph, the others (mona, houlsby, adaptformer, e3va, vpt) with their modules. The written
    file is run on a fresh batch and compared with PyTorch; one that differs by more than --tolerance is not kept."""
    from ..export import export_adapter

    result = export_adapter(
        adapter, out, format, image_size=image_size, pretrained=pretrained, checkpoint=checkpoint,
        tolerance=tolerance, overwrite=overwrite,
    )
    graph = "merged plain timm graph" if result.merged else "with the method's modules"
    console.print(
        f"wrote {result.path} ({result.format}, {graph}, input N x 3 x {result.image_size} x {result.image_size}); "
        f"max logit difference from PyTorch {result.max_difference:.2e}",
        soft_wrap=True, highlight=False,
    )


@app.command()
def push(
    adapter: Path = typer.Argument(..., help="Adapter folder written by `deltavision train` (e.g. runs/flowers/adapter)."),
    repo: str = typer.Option(..., help="Hub repository org/name (created if missing)."),
    private: bool = typer.Option(False, help="Create the repository as private."),
    revision: Optional[str] = typer.Option(None, help="Branch to commit to [default: main]."),
    token: Optional[str] = typer.Option(None, help=(
        "Hub token [default: the HF_TOKEN variable or `hf auth login`'s, which keep it out of shell history]."
    )),
    message: Optional[str] = typer.Option(None, help="Commit message."),
) -> None:
    """Upload an adapter to the Hugging Face Hub with a generated model card (backbone, method, options, trainable
    parameters, the run's metrics and curves, how to load it). The run's log.csv and curves.png are uploaded
    too when they sit next to the adapter folder. Load it back with dv.load_adapter("hf-hub:org/name")."""
    from ..model.hub import push_adapter

    url = push_adapter(adapter, repo, private=private, revision=revision, token=token, commit_message=message)
    console.print(f"pushed {adapter} to {repo}: {url}", soft_wrap=True, highlight=False, markup=False)
    console.print(f'load it with dv.load_adapter("hf-hub:{repo}")', soft_wrap=True, highlight=False, markup=False)
