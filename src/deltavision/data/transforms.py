"""Image transforms: light augmentation for training, plain resize for evaluation."""

from collections.abc import Sequence

from torchvision import transforms as T

TRAIN_CROP_SCALE = (0.6, 1.0)


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
) -> tuple[T.Compose, T.Compose]:
    """Return ``(train_tf, eval_tf)`` turning a PIL RGB image into a normalised CxHxW float tensor.

    Training uses a mild ``RandomResizedCrop`` (scale 0.6-1, suited to small images) and, when
    ``flip`` is true, a random horizontal flip; with ``augment=False`` both transforms are the
    evaluation transform, a square resize to ``image_size``.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    to_normalised_tensor = [T.ToTensor(), T.Normalize(_channel_stats(mean), _channel_stats(std))]
    eval_tf = T.Compose([T.Resize((image_size, image_size), antialias=True), *to_normalised_tensor])
    if not augment:
        return eval_tf, eval_tf
    augmentation = [T.RandomResizedCrop(image_size, scale=TRAIN_CROP_SCALE, antialias=True)]
    if flip:
        augmentation.append(T.RandomHorizontalFlip())
    train_tf = T.Compose([*augmentation, *to_normalised_tensor])
    return train_tf, eval_tf
