"""The service's feature cache: Gather_k of recent images, keyed by the sha256 of their bytes.

MIST's service is task-agnostic (Sec. 2.2): an image used by many edge tasks
needs its features computed once. Entries hold every candidate k of one image
in float32; the cache is bounded by the bytes those tensors take and evicts the
least recently used image first. Safe to use from several threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

Entry = dict[int, torch.Tensor]


def entry_bytes(entry: Entry) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())


class FeatureLRU:
    """A bytes-bounded LRU map from image hash to ``{k: (T, C) tensor}``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: str) -> Entry | None:
        """The entry (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def peek(self, key: str) -> Entry | None:
        """The entry or None, without counting or reordering."""
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, entry: Entry) -> None:
        """Store ``entry``, evicting least recently used ones; an entry larger than the cache is not kept."""
        size = entry_bytes(entry)
        with self._lock:
            if key in self._entries:
                self.bytes -= entry_bytes(self._entries.pop(key))
            if size > self.max_bytes:
                return
            while self.bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= entry_bytes(evicted)
            self._entries[key] = entry
            self.bytes += size

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }
