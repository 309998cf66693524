"""Image transforms from timm's ``create_transform``, with the backbone's own interpolation and crop.

timm is imported when a transform is made, not when this module is: an edge
device lists its images through :func:`deltavision.data.build_datasets` with
``transforms=False`` and has no timm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

TRAIN_CROP_SCALE = (0.6, 1.0)  # milder than timm's (0.08, 1): the bundled sets are small, low-resolution images


@dataclass(frozen=True)
class Augmentation:
    """How training images are augmented beyond random resized crops and flips (timm's options).

    The defaults add nothing (today's mild recipe); SSF's recipe is
    ``Augmentation(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)``.
    """

    auto_augment: str | None = None  # e.g. "rand-m9-mstd0.5-inc1" (RandAugment), "augmix-m5-w4-d2"
    reprob: float = 0.0  # random erasing probability
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter (timm turns it off under RandAugment)


def _channel_stats(values: float | Sequence[float]) -> tuple[float, ...]:
    """Normalisation statistics as a tuple of floats (a scalar becomes one value per RGB channel)."""
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    return tuple(float(value) for value in values)


def make_transforms(
    image_size: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    augment: bool,
    *,
    flip: bool = True,
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
    augmentation: Augmentation = Augmentation(),
):
    """Return ``(train_tf, eval_tf)`` turning a PIL RGB image into a normalised CxHxW float tensor.

    Evaluation resizes to ``image_size / crop_pct`` and centre-crops ``image_size``
    (``crop_pct=1``: a plain square resize). Training takes a random resized crop
    (scale 0.6-1, suited to small images), a horizontal flip when ``flip`` is true, then
    ``augmentation``'s RandAugment, colour jitter and random erasing; with
    ``augment=False`` both transforms are the evaluation transform.
    """
    from timm.data import create_transform

    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    stats = {"mean": _channel_stats(mean), "std": _channel_stats(std), "interpolation": interpolation}
    eval_tf = create_transform(image_size, is_training=False, crop_pct=crop_pct, **stats)
    if not augment:
        return eval_tf, eval_tf
    train_tf = create_transform(
        image_size, is_training=True, scale=TRAIN_CROP_SCALE, hflip=0.5 if flip else 0.0,
        color_jitter=augmentation.color_jitter or None, auto_augment=augmentation.auto_augment,
        re_prob=augmentation.reprob, **stats,
    )
    _keep_a_posterize_bit(train_tf)
    return train_tf, eval_tf


def _keep_a_posterize_bit(transform) -> None:
    """Make the policy's Posterize ops keep at least one bit.

    timm's increasing posterize (the ``inc1`` of SSF's ``rand-m9-mstd0.5-inc1``)
    asks for 0 bits when the sampled magnitude reaches its maximum, which
    Pillow (11 and later) refuses with a ValueError in the middle of an epoch;
    0 bits would be an all-black image anyway. Only this transform's ops change.
    """
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize_at_least_one_bit


def _posterize_at_least_one_bit(image, bits_to_keep, **_):
    from PIL import ImageOps

    return image if bits_to_keep >= 8 else ImageOps.posterize(image, max(1, bits_to_keep))
