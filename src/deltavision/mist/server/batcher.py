"""Micro-batching: images of concurrent requests share one backbone pass.

Requests submit single images; a worker thread takes the first waiting image,
waits at most ``max_wait`` seconds for more (up to ``max_batch``), runs the
batch once and resolves every submitter's future. An image already waiting or
running under the same digest is not queued twice: its submitters share a
future, and one the cache holds is not queued at all.

This module is the one place that reads and writes the feature cache
(:meth:`MicroBatcher.cached`, the check in :meth:`MicroBatcher.submit`, the
store in ``_run``): results are kept in the cache before their digest leaves
the pending map, so under the lock an image is pending or cached, never in
between, and every submitter gets the cache's first answer.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from .cache import Entry, FeatureLRU

BatchFn = Callable[[Sequence[str], torch.Tensor], Sequence[Any]]


class QueueFull(RuntimeError):
    """More images are waiting than the batcher accepts; retry later."""


@dataclass
class _Job:
    digest: str
    pixels: torch.Tensor
    future: Future


class MicroBatcher:
    """Runs ``run_batch(digests, stacked_pixels) -> one entry per image`` on batches, in one thread.

    Each submitter's future completes with its image's cached entry (or the batch's exception).
    """

    def __init__(
        self,
        run_batch: BatchFn,
        cache: FeatureLRU,
        max_batch: int = 32,
        max_wait: float = 0.005,
        max_pending: int = 1024,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_pending = max_pending
        self.cache = cache
        self.on_batch = on_batch  # (images, seconds) after every backbone pass
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.batches = 0
        self.images = 0
        self._worker = threading.Thread(target=self._work, name="deltavision-batcher", daemon=True)
        self._worker.start()

    def cached(self, digest: str) -> Entry | None:
        """The cached entry of ``digest`` (counted as a cache hit or miss), or None."""
        return self.cache.get(digest)

    def submit(self, digest: str, pixels: torch.Tensor) -> Future:
        """A future of ``digest``'s entry; raises QueueFull when too many images are waiting."""
        with self._lock:
            if digest in self._pending:
                return self._pending[digest]
            stored = self.cache.peek(digest)
            if stored is not None:
                done: Future = Future()
                done.set_result(stored)
                return done
            if len(self._pending) >= self.max_pending:
                raise QueueFull(f"{len(self._pending)} images are waiting")
            future: Future = Future()
            self._pending[digest] = future
        self._queue.put(_Job(digest, pixels, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after the images already queued."""
        self._queue.put(None)
        self._worker.join(timeout)

    def alive(self) -> bool:
        """Whether the worker thread still runs batches."""
        return self._worker.is_alive()

    def stats(self) -> dict[str, float]:
        return {
            "batches": self.batches,
            "images_computed": self.images,
            "mean_batch": self.images / self.batches if self.batches else 0.0,
            "waiting": len(self._pending),
        }

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._collect(first)
            self._run(jobs)
            if stop:
                return

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """``first`` plus whatever arrives within ``max_wait``, up to ``max_batch`` jobs."""
        jobs, deadline = [first], time.monotonic() + self.max_wait
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _run(self, jobs: list[_Job]) -> None:
        results, error = [None] * len(jobs), None
        try:
            started = time.perf_counter()
            computed = self.run_batch([job.digest for job in jobs], torch.stack([job.pixels for job in jobs]))
            if self.on_batch is not None:
                self.on_batch(len(jobs), time.perf_counter() - started)
            results = [self.cache.keep(job.digest, entry) for job, entry in zip(jobs, computed)]
        except Exception as err:  # reported to every waiting request, the worker lives on
            error = err
        self.batches += 1
        self.images += len(jobs)
        with self._lock:
            for job in jobs:
                self._pending.pop(job.digest, None)
        for job, result in zip(jobs, results):
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
