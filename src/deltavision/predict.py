"""Predictions of a saved adapter on image files: labels for classifiers, overlay PNGs for segmenters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data.images import load_rgb_image
from .errors import AdapterFileError
from .io import atomic_write, ensure_writable_dir
from .model import load_adapter, read_adapter_config
from .model.hub import resolve_adapter
from .tasks.registry import get_task
from .train.device import resolve_device

OVERLAY_ALPHA = 0.5


def predict_images(
    adapter: str | Path, images: list[Path], out: Path | None = None, *, top: int = 3, pretrained: bool = True,
    checkpoint=None, device: str = "cpu", score_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """One dict per image: the top classes (classification), or the pixel share of each class and the
    overlay PNG written to ``out`` (segmentation)."""
    adapter = resolve_adapter(adapter)  # a folder, or an hf-hub: id fetched once
    config = read_adapter_config(adapter)
    if "data" not in config or "classes" not in config:
        raise AdapterFileError(f"{adapter} does not record its input size and classes; train it with `deltavision train`")
    target = resolve_device(device)
    model = load_adapter(adapter, pretrained=pretrained, checkpoint=checkpoint).to(target).eval()
    task = get_task(config.get("task", "classification"))
    if task.dense:
        if out is None:
            raise AdapterFileError(f"a {task.name} adapter draws its predictions: pass --out DIR")
        ensure_writable_dir(out)
    if task.segments:
        return [_segment(model, path, config, out, target) for path in images]
    if task.detects:
        return [_detect(model, path, config, out, target, score_threshold) for path in images]
    return [_classify(model, path, config, top, target) for path in images]


def _classify(model, path: Path, config: dict, top: int, device) -> dict[str, Any]:
    from .data.transforms import make_transforms

    data = config["data"]
    transform = make_transforms(data["image_size"], data["mean"], data["std"], augment=False)[1]
    with torch.no_grad():
        probabilities = model(transform(load_rgb_image(path))[None].to(device)).softmax(dim=1)[0].cpu()
    scores, indices = probabilities.topk(min(top, probabilities.numel()))
    return {"image": str(path), "top": [(config["classes"][i], float(s)) for s, i in zip(scores, indices.tolist())]}


def _segment(model, path: Path, config: dict, out: Path, device) -> dict[str, Any]:
    from torchvision.transforms.v2.functional import pil_to_tensor

    from .data.segmentation import make_segmentation_transforms

    data = config["data"]
    transform = make_segmentation_transforms(data["image_size"], data["mean"], data["std"], augment=False)[1]
    picture = load_rgb_image(path)
    from torchvision import tv_tensors

    image = transform(tv_tensors.Image(pil_to_tensor(picture))).as_subclass(torch.Tensor)
    with torch.no_grad():
        logits = model(image[None].to(device)).float()
        logits = F.interpolate(logits, size=(picture.height, picture.width), mode="bilinear", align_corners=False)
    mask = logits.argmax(dim=1)[0].cpu().numpy()
    overlay = out / f"{path.stem}.png"
    draw_overlay(np.asarray(picture), mask, config["classes"], overlay)
    counts = np.bincount(mask.ravel(), minlength=len(config["classes"])) / mask.size
    shares = {name: float(c) for name, c in zip(config["classes"], counts) if c > 0}
    return {"image": str(path), "overlay": str(overlay), "classes": shares}


def _detect(model, path: Path, config: dict, out: Path, device, score_threshold: float) -> dict[str, Any]:
    """Boxes, class names, scores (and masks) drawn over the image at its own size."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    from .tasks.drawing_detection import draw_detections

    picture = load_rgb_image(path)
    image = pil_to_tensor(picture).float() / 255  # the detector resizes to its training size and maps back
    for module in model.modules():  # torchvision's detectors drop scores under 0.05; the user's threshold rules
        if isinstance(getattr(module, "score_thresh", None), float):
            module.score_thresh = min(module.score_thresh, score_threshold)
    with torch.no_grad():
        prediction = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
    drawing = out / f"{path.stem}.png"
    atomic_write(drawing, lambda tmp: draw_detections(picture, prediction, config["classes"], score_threshold)
                 .save(tmp, format="PNG"))
    kept = prediction["scores"] >= score_threshold
    detections = [{"class": config["classes"][label], "score": float(score), "box": [round(v, 1) for v in box]}
                  for label, score, box in zip(prediction["labels"][kept].tolist(), prediction["scores"][kept],
                                               prediction["boxes"][kept].tolist())]
    return {"image": str(path), "overlay": str(drawing), "detections": detections}


def class_colours(count: int) -> np.ndarray:
    """RGB in [0, 1] per class: matplotlib's tab20, repeated past twenty."""
    from matplotlib import colormaps

    return np.array([colormaps["tab20"](i % 20)[:3] for i in range(count)])


def draw_overlay(image: np.ndarray, mask: np.ndarray, classes: list[str], path: Path) -> None:
    """The image with each class's pixels tinted (a class named "background" left clear) and a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = class_colours(len(classes))
    tint = np.zeros((*mask.shape, 4))
    tint[..., :3] = colours[mask]
    tint[..., 3] = np.where(np.array([c == "background" for c in classes])[mask], 0.0, OVERLAY_ALPHA)
    height, width = mask.shape
    fig, ax = plt.subplots(figsize=(max(4.0, width / 64 + 2.5), max(3.0, height / 64)))
    ax.imshow(image)
    ax.imshow(tint)
    ax.axis("off")
    present = [i for i in np.unique(mask) if classes[i] != "background"]
    handles = [Patch(color=colours[i], label=classes[i]) for i in present]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
