"""The service's feature cache: Gather_k of recent images, keyed by their digest (sha256 of the bytes).

MIST's service is task-agnostic (Sec. 2.2): an image used by many edge tasks
needs its features computed once. Entries hold every candidate k of one image
in float32; the cache is bounded by the bytes those tensors take and evicts the
least recently used image first. Safe to use from several threads.

First answer wins: :meth:`FeatureLRU.keep` never replaces a stored entry, so
while an image stays cached every request for it gets the very same tensors.
(Float32 features of one image differ with the batch it was computed in, by up
to ~1e-4, because matrix kernels block their sums by batch size.)
Only :mod:`.batcher` reads and writes the cache. :mod:`.redis_cache` is the shared
alternative with the same methods (``--cache redis://...``); :func:`make_cache` picks one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

Entry = dict[int, torch.Tensor]


def entry_bytes(entry: Entry) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())


class FeatureLRU:
    """A bytes-bounded LRU map from image digest to ``{k: (T, C) tensor}``."""

    kind = "memory"

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._entries

    def get(self, digest: str) -> Entry | None:
        """The entry (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(digest)
            self.hits += 1
            return entry

    def peek(self, digest: str) -> Entry | None:
        """The entry or None, without counting or reordering."""
        with self._lock:
            return self._entries.get(digest)

    def keep(self, digest: str, entry: Entry) -> Entry:
        """The entry stored for ``digest``: the one already there, else ``entry`` (stored if it fits)."""
        size = entry_bytes(entry)
        with self._lock:
            stored = self._entries.get(digest)
            if stored is not None:
                return stored
            if size > self.max_bytes:
                return entry
            while self.bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= entry_bytes(evicted)
                self.evictions += 1
            self._entries[digest] = entry
            self.bytes += size
            return entry

    def healthy(self) -> bool:
        """An in-process cache is always reachable."""
        return True

    def stats(self) -> dict[str, int | str]:
        with self._lock:
            return {
                "kind": "memory",
                "entries": len(self._entries),
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "errors": 0,
            }


def make_cache(url: str | None, max_bytes: int, namespace: str, ks) -> "FeatureLRU":
    """The in-process LRU (``url`` None or ``memory``), or the shared Redis cache of a ``redis://`` URL.

    ``namespace`` (the service fingerprint) and ``ks`` become part of every Redis key."""
    if url is None or url == "memory":
        return FeatureLRU(max_bytes)
    from .redis_cache import RedisFeatureCache, check_redis_url

    check_redis_url(url)
    return RedisFeatureCache(url, namespace, ks, max_bytes)
