"""Pictures of detections: boxes, class names and scores, and instance masks, drawn onto the image."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

SCORE_THRESHOLD = 0.5
MASK_THRESHOLD = 0.5
MASK_ALPHA = 0.45


def class_colour(label: int) -> tuple[int, int, int]:
    """A bright colour per class, the same in every picture (golden-ratio hues)."""
    red, green, blue = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 1.0)
    return round(255 * red), round(255 * green), round(255 * blue)


def _as_uint8(image) -> torch.Tensor:
    """A 3 x H x W uint8 tensor from a PIL image, a uint8 tensor or a float tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return pil_to_tensor(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image).permute(2, 0, 1)
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return image.cpu()


def draw_detections(image, prediction: dict, classes: list[str], score_threshold: float = SCORE_THRESHOLD
                    ) -> Image.Image:
    """``image`` with the ``prediction``'s detections scoring at least ``score_threshold`` drawn on it.

    ``prediction`` is one of a torchvision detector's eval outputs (``boxes``,
    ``labels``, ``scores``, optional ``masks`` N x 1 x H x W probabilities, in
    the image's own pixels); ``classes[label]`` names each box, with its score.
    """
    canvas = _as_uint8(image)
    keep = prediction["scores"].detach().cpu() >= score_threshold
    boxes = prediction["boxes"].detach().cpu()[keep].float()
    labels = prediction["labels"].detach().cpu()[keep].tolist()
    scores = prediction["scores"].detach().cpu()[keep].tolist()
    colours = [class_colour(label) for label in labels]
    if "masks" in prediction and len(labels):
        masks = prediction["masks"].detach().cpu()[keep]
        masks = (masks[:, 0] if masks.ndim == 4 else masks) > MASK_THRESHOLD
        canvas = draw_segmentation_masks(canvas, masks, alpha=MASK_ALPHA, colors=colours)
    names = [f"{classes[label] if 0 <= label < len(classes) else label} {score:.2f}"
             for label, score in zip(labels, scores)]
    if len(labels):
        canvas = draw_bounding_boxes(canvas, boxes, labels=names, colors=colours, width=2)
    return to_pil_image(canvas)
