"""The edge's side of the wire: ask the service for Gather_k and keep the answers.

Images are sent as their encoded bytes (files as they are on disk, bundled
arrays as PNG) and identified by their digest (sha256 of those bytes), the key the
service caches under. :func:`download_features` sends each image at most once
across runs: whatever the local :class:`~.store.FeatureStore` already holds is
never requested again. :func:`connected` opens a client checked to serve the
feature space an edge model was trained on.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from tqdm.auto import tqdm

from ...errors import DataError, DeltaVisionError
from .store import FeatureStore
from ..wire import FeaturePayload, PayloadError, digest, unpack

if TYPE_CHECKING:
    from .network import EdgeConfig

RETRY_STATUSES = {429, 502, 503, 504}
RETRY_SECONDS = 60.0
FIRST_DELAY, LONGEST_DELAY = 0.25, 8.0


class ServiceError(DeltaVisionError):
    """The feature service could not be reached or refused a request."""


@dataclass(frozen=True)
class ImageItem:
    """One labelled image: the digest of its encoded bytes and how to get those bytes again."""

    digest: str
    label: int
    path: Path | None = None
    encoded: bytes | None = None

    def read(self) -> bytes:
        return self.encoded if self.encoded is not None else Path(self.path).read_bytes()


@dataclass(frozen=True)
class LabelledImages:
    classes: list[str]
    train: list[ImageItem]
    val: list[ImageItem]


class FeatureClient:
    """HTTP client of the feature service that rides out a busy or restarting service.

    A request that cannot connect, gets 429/502/503/504, or gets a 500 that is not
    the service's own JSON error (the engine in front of it lost the replica that
    was answering: Ray Serve says 500 then) is sent again after
    0.25 s, 0.5 s, 1 s, ... (at most 8 s apart) until ``retry_seconds`` have
    passed since its first attempt; only then is it a ServiceError. The default
    minute outlasts a service restart (loading a backbone takes seconds).
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: float = 300.0,
        retry_seconds: float = RETRY_SECONDS,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.retry_seconds = float(retry_seconds)
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self._sleep, self._clock = sleep, clock
        self._info: dict[str, Any] | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "FeatureClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = self._request("GET", "/v1/info").json()
        return self._info

    def features(self, images: Sequence[bytes], ks: Sequence[int], dtype: str) -> FeaturePayload:
        """Gather_k of ``images`` for every k in ``ks``, checked against the images' digests."""
        files = [("images", (f"{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
        params = {"k": ",".join(str(k) for k in ks), "dtype": dtype}
        response = self._request("POST", "/v1/features", params=params, files=files)
        try:
            payload = unpack(response.content)
        except PayloadError as err:
            raise ServiceError(f"{self.url} sent an unreadable feature payload ({err})") from err
        expected = [digest(data) for data in images]
        if payload.digests != expected or set(payload.ks) != set(ks):
            raise ServiceError(f"{self.url} answered for other images or k values than asked")
        return payload

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        deadline = self._clock() + self.retry_seconds
        for delay in backoff_delays():
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as err:
                if self._clock() + delay > deadline:
                    raise ServiceError(
                        f"cannot reach the feature service at {self.url} ({type(err).__name__}) "
                        f"after retrying for {self.retry_seconds:g} s (--retry-seconds)"
                    ) from err
            else:
                if not _retriable(response) or self._clock() + delay > deadline:
                    return _checked(response, self.url)
            self._sleep(delay)
        raise AssertionError("unreachable")


@contextmanager
def connected(
    server: str | None, token: str | None, config: EdgeConfig, retry_seconds: float = RETRY_SECONDS
) -> Iterator[FeatureClient]:
    """A FeatureClient checked to serve the feature space the edge model of ``config`` was trained on."""
    if not server:
        raise DeltaVisionError("pass --server URL (or --offline to use the feature cache)")
    with FeatureClient(server, token, retry_seconds=retry_seconds) as client:
        fingerprint = client.info()["fingerprint"]
        if fingerprint != config.fingerprint:
            raise DeltaVisionError(
                f"the service at {client.url} computes other features (fingerprint {fingerprint}) than "
                f"this edge model was trained on ({config.fingerprint}, backbone {config.backbone})"
            )
        yield client


def _retriable(response: httpx.Response) -> bool:
    """Busy or unavailable (429/502/503/504), or a 500 without the service's JSON error body.

    Every request is a pure function of its images, so sending it again is safe."""
    if response.status_code in RETRY_STATUSES:
        return True
    if response.status_code != 500:
        return False
    try:
        body = response.json()
    except ValueError:
        return True
    return not (isinstance(body, dict) and "error" in body)


def backoff_delays():
    """0.25, 0.5, 1, 2, 4, 8, 8, ... seconds: the waits between attempts of one request."""
    delay = FIRST_DELAY
    while True:
        yield delay
        delay = min(LONGEST_DELAY, delay * 2)


def _checked(response: httpx.Response, url: str) -> httpx.Response:
    if response.status_code < 400:
        return response
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    if response.status_code == 401:
        raise ServiceError(f"{url} refused the token ({message}); pass --token or set DELTAVISION_TOKEN")
    raise ServiceError(f"{url} answered {response.status_code}: {message}")


# --- images to send -----------------------------------------------------------------------------


def encode_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_item(label: int, path: Path | None = None, encoded: bytes | None = None) -> ImageItem:
    data = encoded if encoded is not None else Path(path).read_bytes()
    return ImageItem(digest(data), int(label), path, encoded)


def _items_of(dataset) -> list[ImageItem]:
    """Items of a dataset made by build_datasets: files stay on disk, arrays and fetched images become PNG bytes."""
    if hasattr(dataset, "paths"):
        return [image_item(label, path=path) for path, label in zip(dataset.paths, dataset.labels)]
    if hasattr(dataset, "fetch"):  # Hugging Face or torchvision images
        from ...data.images import to_rgb

        return [image_item(label, encoded=encode_png(np.asarray(to_rgb(dataset.fetch(int(index))))))
                for index, label in zip(dataset.indices, dataset.labels)]
    return [image_item(label, encoded=encode_png(pixels)) for pixels, label in zip(dataset.images, dataset.labels)]


def labelled_images(
    data: str | Path,
    *,
    val_fraction: float = 0.2,
    train_limit: int | None = None,
    val_limit: int | None = None,
    seed: int = 0,
) -> LabelledImages:
    """Train/val images of a folder or bundled dataset, split exactly as :func:`build_datasets` splits."""
    from ...data import build_datasets

    splits = build_datasets(
        data, image_size=1, mean=0.0, std=1.0, val_fraction=val_fraction,
        train_limit=train_limit, val_limit=val_limit, augment=False, seed=seed, transforms=False,
    )  # fmt: skip
    return LabelledImages(list(splits.classes), _items_of(splits.train), _items_of(splits.val))


def image_files(paths: Sequence[Path]) -> list[ImageItem]:
    """Unlabelled items for files to predict; DataError for a missing one."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"no such image file: {', '.join(missing[:3])}")
    return [image_item(-1, path=Path(p)) for p in paths]


# --- download into the local cache --------------------------------------------------------------


def download_features(
    client: FeatureClient,
    store: FeatureStore,
    items: Sequence[ImageItem],
    ks: Sequence[int],
    dtype: str,
    *,
    batch_size: int | None = None,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> int:
    """Fetch Gather_k (every k of ``ks``) for the images ``store`` lacks; returns how many were sent.

    Each batch becomes one shard per k as soon as it arrives, so an interruption
    loses at most the batch in flight. ``on_shard(batches_done)`` runs after each.
    """
    for k in ks:
        store.discard_damaged(k, dtype)  # their images are missing now, so fetched again
    missing = set(store.missing([item.digest for item in items], ks, dtype))
    todo = list({item.digest: item for item in items if item.digest in missing}.values())
    limits = dict(client.info()["limits"])
    limits["max_images"] = max(1, min(batch_size or limits["max_images"], limits["max_images"]))
    bar = tqdm(total=len(todo), desc=f"features k={','.join(map(str, ks))} {dtype}", unit="img", disable=not progress)
    for done, batch in enumerate(request_batches(todo, limits), start=1):
        payload = client.features(batch, ks, dtype)
        for k in ks:
            store.write_shard(k, dtype, payload.digests, payload.features[k], payload.scales.get(k))
        bar.update(len(batch))
        if on_shard is not None:
            on_shard(done)
    bar.close()
    return len(todo)


def request_batches(items: Sequence[ImageItem], limits: dict[str, Any]):
    """Encoded images in request-sized batches under the service's ``limits``: at most
    ``max_images``, under the body limit with room for the multipart framing, and holding at most
    ``max_request_pixels`` (an image too big on its own travels alone)."""
    max_images = max(1, int(limits["max_images"]))
    budget = int(limits["max_body_bytes"] * 0.9) - 4096
    max_pixels = limits.get("max_request_pixels")  # absent from services before it existed
    batch: list[bytes] = []
    size = pixels = 0
    for item in items:
        data = item.read()
        area = image_pixels(data) if max_pixels else 0
        full = len(batch) == max_images or size + len(data) > budget or (max_pixels and pixels + area > max_pixels)
        if batch and full:
            yield batch
            batch, size, pixels = [], 0, 0
        batch.append(data)
        size += len(data)
        pixels += area
    if batch:
        yield batch


def image_pixels(data: bytes) -> int:
    """Width x height from an image's header (0 if unreadable: the service will say why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # undecodable bytes are reported by the service, with the image's name
        return 0
    return width * height
