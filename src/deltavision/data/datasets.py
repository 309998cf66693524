"""Torch datasets over in-memory uint8 arrays and over image files."""

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from deltavision.data.images import load_rgb_image, to_rgb

Transform = Callable[[Image.Image], torch.Tensor]


def _apply(transform: Transform | None, image: Image.Image) -> torch.Tensor | Image.Image:
    """``transform(image)``, or the image unchanged when there is no transform."""
    return image if transform is None else transform(image)


class ArrayImageDataset(Dataset):
    """Images kept as one uint8 array (N x H x W grey or N x H x W x 3 RGB), converted per item.

    Items are ``(transform(rgb_pil_image), int_label)`` (the PIL image itself if ``transform`` is
    None); grey images become RGB by replicating their channel.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Transform | None = None):
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        image = to_rgb(Image.fromarray(self.images[index]))
        return _apply(self.transform, image), int(self.labels[index])

    def subset(self, indices: np.ndarray, transform: Transform | None = None) -> "ArrayImageDataset":
        """A new dataset holding only ``indices`` (a copy of those rows), optionally re-transformed.

        Asking for every index in order shares the arrays instead of copying them.
        """
        if np.array_equal(indices, np.arange(len(self))):
            return ArrayImageDataset(self.images, self.labels, transform or self.transform)
        return ArrayImageDataset(self.images[indices], self.labels[indices], transform or self.transform)


class ImageFileDataset(Dataset):
    """Images read from files on demand; items are ``(transform(rgb_pil_image), int_label)``.

    With ``transform=None`` items hold the RGB PIL image itself.

    A file that fails to decode raises :class:`~deltavision.errors.DataError` naming it.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | np.ndarray, transform: Transform | None = None):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [Path(path) for path in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        image = load_rgb_image(self.paths[index])
        return _apply(self.transform, image), int(self.labels[index])

    def subset(self, indices: np.ndarray, transform: Transform | None = None) -> "ImageFileDataset":
        """A new dataset holding only ``indices``, optionally with another transform."""
        paths = [self.paths[i] for i in indices]
        return ImageFileDataset(paths, self.labels[indices], transform or self.transform)


class FetchedImageDataset(Dataset):
    """Images fetched by index from another store (a Hugging Face or torchvision dataset), labels held here.

    ``fetch(i)`` returns the PIL image of the store's item ``i``; ``indices`` picks and orders the
    store's items (all of them by default). Items are ``(transform(rgb_pil_image), int_label)``.
    """

    def __init__(
        self,
        fetch: Callable[[int], Image.Image],
        labels: Sequence[int] | np.ndarray,
        indices: np.ndarray | None = None,
        transform: Transform | None = None,
    ):
        self.fetch = fetch
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)[self.indices]
        self._all_labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        image = to_rgb(self.fetch(int(self.indices[index])))
        return _apply(self.transform, image), int(self.labels[index])

    def subset(self, indices: np.ndarray, transform: Transform | None = None) -> "FetchedImageDataset":
        """A new dataset holding only ``indices`` of this one, optionally with another transform."""
        chosen = self.indices[np.asarray(indices, dtype=np.int64)]
        return FetchedImageDataset(self.fetch, self._all_labels, chosen, transform or self.transform)
