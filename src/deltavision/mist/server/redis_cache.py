"""The shared feature cache in Redis (``serve --cache redis://HOST:PORT/DB``).

Several service processes (Ray Serve replicas, or separate machines) share what
they computed: an image any of them gathered is a cache hit for all. Same methods
as :class:`.cache.FeatureLRU`, so :mod:`.batcher` uses either.

Keys: ``deltavision:{<fingerprint>:<digest>}:k<k>:float32``, one per candidate k,
holding that Gather_k of one image as a safetensors blob (never pickle). The
fingerprint names the backbone, weights, image size, normalisation and decoding,
so two backbones or two k never share an entry; the braces keep one image's keys
in one Redis Cluster slot. All keys of an image are written at once with MSETNX:
the first replica's answer wins, as in the in-process cache, and every replica
returns the tensors stored.

Memory bound and eviction live on the Redis side: at start the service sets
``maxmemory`` (``--cache-mb``) and ``maxmemory-policy allkeys-lru`` with CONFIG SET;
a server that refuses CONFIG (managed Redis) is logged and must be configured by
its operator.

Degraded, never failing: any Redis error (down, timed out, out of memory) is
logged, counted in ``errors``, and the request goes on as a cache miss (features
are computed, not stored). After a connection failure Redis is left alone for
``retry_after`` seconds, so a dead Redis costs no time per request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from urllib.parse import urlparse

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ...errors import DeltaVisionError
from .cache import Entry

log = logging.getLogger(__name__)
SCHEMES = ("redis", "rediss", "unix")
STORED_DTYPE = "float32"
SOCKET_TIMEOUT = 1.0
RETRY_AFTER = 2.0
LOG_EVERY = 10.0  # seconds between two warnings about failing Redis calls


class CacheURLError(DeltaVisionError, ValueError):
    """A ``--cache`` value that names no usable cache."""


def check_redis_url(url: str) -> None:
    """Refuse a cache URL that is not redis://, rediss:// or unix://, or Redis support that is not installed."""
    if urlparse(url).scheme not in SCHEMES:
        raise CacheURLError(f"--cache must be 'memory' or redis://HOST:PORT/DB (also rediss://, unix://); got {url!r}")
    try:
        import redis  # noqa: F401
    except ImportError as err:
        raise CacheURLError(f"--cache {url} needs the redis client: pip install 'deltavision[scale]'") from err


def image_keys(namespace: str, digest: str, ks: Sequence[int]) -> list[str]:
    """The Redis keys of one image's Gather_k, one per k."""
    return [f"deltavision:{{{namespace}:{digest}}}:k{k}:{STORED_DTYPE}" for k in ks]


def _encode(tensor: torch.Tensor) -> bytes:
    return save_tensors({"features": tensor.contiguous()})


def _decode(blob: bytes) -> torch.Tensor:
    return load_tensors(blob)["features"]


class RedisFeatureCache:
    """Gather_k of images in a Redis database, with hit/miss/error counts of this process."""

    kind = "redis"

    def __init__(self, url: str, namespace: str, ks: Sequence[int], max_bytes: int, retry_after: float = RETRY_AFTER):
        import redis

        self.url, self.namespace, self.ks = url, namespace, tuple(ks)
        self.max_bytes = int(max_bytes)
        self.retry_after = retry_after
        self.client = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT)
        self._errors = (redis.RedisError, OSError)
        self._unreachable = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._logged_at = -LOG_EVERY
        self.hits = self.misses = self.errors = 0
        self._server: dict[str, int] = {}
        self.configure()

    def configure(self) -> bool:
        """Set the memory bound and LRU eviction on the server; False (logged) if refused or unreachable."""
        if self.max_bytes <= 0:
            log.warning("--cache-mb 0 leaves Redis unbounded (maxmemory 0 means no limit); not configuring it")
            return False
        settings = {"maxmemory": str(self.max_bytes), "maxmemory-policy": "allkeys-lru"}
        try:
            for name, value in settings.items():
                self.client.config_set(name, value)
        except self._errors as err:
            self._failed("configure", err)
            log.warning("could not set maxmemory/maxmemory-policy on %s (%s): set maxmemory %d and "
                        "maxmemory-policy allkeys-lru on the server yourself", self.url, err, self.max_bytes)
            return False
        return True

    def healthy(self) -> bool:
        """Whether Redis answered the last time it was asked (False while it is left alone after a failure)."""
        return time.monotonic() >= self._down_until

    def get(self, digest: str) -> Entry | None:
        """The entry stored for ``digest``, or None (also when Redis fails); counts a hit or a miss."""
        entry = self.peek(digest)
        with self._lock:
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
        return entry

    def peek(self, digest: str) -> Entry | None:
        """The entry or None, without counting."""
        blobs = self._call("read", lambda: self.client.mget(image_keys(self.namespace, digest, self.ks)))
        if not blobs or any(blob is None for blob in blobs):
            return None
        return {k: _decode(blob) for k, blob in zip(self.ks, blobs)}

    def keep(self, digest: str, entry: Entry) -> Entry:
        """The entry stored for ``digest``: the one already in Redis, else ``entry`` (stored if Redis takes it)."""
        keys = image_keys(self.namespace, digest, self.ks)
        mapping = {key: _encode(entry[k]) for key, k in zip(keys, self.ks)}
        created = self._call("write", lambda: self.client.msetnx(mapping))
        if created is None or created:
            return entry
        stored = self.peek(digest)
        if stored is not None:
            return stored
        self._call("write", lambda: self.client.mset(mapping))  # some k were evicted: replace the remnant
        return entry

    def stats(self) -> dict[str, int | str]:
        info = self._call("stats", self._server_stats)
        if info is not None:
            self._server = info
        with self._lock:
            counts = {"hits": self.hits, "misses": self.misses, "errors": self.errors}
        return {"kind": "redis", "reachable": int(self.healthy()), **counts,
                "evictions": 0, "bytes": 0, "max_bytes": self.max_bytes, "keys": 0, **self._server}  # fmt: skip

    def _server_stats(self) -> dict[str, int]:
        info = self.client.info()
        return {"evictions": int(info.get("evicted_keys", 0)), "bytes": int(info.get("used_memory", 0)),
                "max_bytes": int(info.get("maxmemory", 0)), "keys": int(self.client.dbsize())}  # fmt: skip

    def _call(self, action: str, command):
        """``command()``, or None when Redis is being left alone or fails (logged and counted)."""
        if not self.healthy():
            return None
        try:
            return command()
        except self._errors as err:
            self._failed(action, err)
            return None

    def _failed(self, action: str, err: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            self.errors += 1
            if isinstance(err, self._unreachable):
                self._down_until = now + self.retry_after
            quiet = now - self._logged_at < LOG_EVERY
            if not quiet:
                self._logged_at = now
        if not quiet:
            log.warning("Redis cache %s failed to %s (%s: %s); computing features without it",
                        self.url, action, type(err).__name__, str(err)[:200])
