"""Prometheus metrics of one service process (``GET /metrics``), with prometheus-client.

Each :class:`ServiceMetrics` has its own registry, so several services in one
process (tests) never mix their numbers. Under Ray Serve every replica is one
process: ``/metrics`` through the proxy answers for the replica that served the
scrape (its ``replica`` label says which); scrape the replicas one by one, or
use Ray's own metrics export, for a cluster-wide view.

Measured as they happen: requests by endpoint and status, request latency,
batch sizes and backbone time per batch. Read when scraped (:class:`_StateCollector`):
queue depth, cache hits/misses/evictions/errors and size, and images computed
per second over the last minute.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported for the app)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ENDPOINTS = ("/health", "/healthz", "/metrics", "/v1/info", "/v1/stats", "/v1/features")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RATE_WINDOW = 60.0


def endpoint_label(path: str) -> str:
    """The path if it is one of the service's endpoints, else "other" (bounded label values)."""
    return path if path in ENDPOINTS else "other"


class ServiceMetrics:
    """Counters and histograms of one service; ``state()`` supplies what is read at scrape time."""

    def __init__(self, state: Callable[[], dict[str, Any]], replica: str = ""):
        self.registry = CollectorRegistry()
        self.requests = Counter("deltavision_requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=self.registry)  # fmt: skip
        self.latency = Histogram("deltavision_request_seconds", "Time from request to response, by endpoint.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.batch_size = Histogram("deltavision_batch_size", "Images per backbone pass.",
                                    buckets=BATCH_BUCKETS, registry=self.registry)  # fmt: skip
        self.batch_seconds = Histogram("deltavision_batch_seconds", "Backbone time per batch.",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self._computed: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.registry.register(_StateCollector(state, self.images_per_second, replica))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, images: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.batch_seconds.observe(seconds)
        now = time.monotonic()
        with self._lock:
            self._computed.append((now, images))
            self._forget_before(now - RATE_WINDOW)

    def images_per_second(self) -> float:
        """Images computed per second over the last minute."""
        now = time.monotonic()
        with self._lock:
            self._forget_before(now - RATE_WINDOW)
            return sum(images for _, images in self._computed) / RATE_WINDOW

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)

    def _forget_before(self, moment: float) -> None:
        while self._computed and self._computed[0][0] < moment:
            self._computed.popleft()


class _StateCollector:
    """Metrics read from the service when scraped: queue, cache, computed images."""

    def __init__(self, state: Callable[[], dict[str, Any]], rate: Callable[[], float], replica: str):
        self.state, self.rate, self.replica = state, rate, replica

    def describe(self):
        return []  # registered without describing: nothing is read before the first scrape

    def collect(self):
        state = self.state()
        cache, batching = state["cache"], state["batching"]
        labels = {"replica": self.replica, "cache": str(cache["kind"])}
        names, values = list(labels), list(labels.values())

        def gauge(name: str, doc: str, value: float):
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float):
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        yield gauge("deltavision_queue_depth", "Images waiting for or in a backbone pass.", batching["waiting"])
        yield counter("deltavision_images_computed", "Images run through the backbone.", batching["images_computed"])
        yield counter("deltavision_batches", "Backbone passes.", batching["batches"])
        yield gauge("deltavision_images_per_second", f"Images computed per second over the last {RATE_WINDOW:g} s.",
                    self.rate())  # fmt: skip
        yield counter("deltavision_cache_hits", "Images answered from the cache.", cache["hits"])
        yield counter("deltavision_cache_misses", "Images the cache did not hold.", cache["misses"])
        yield counter("deltavision_cache_evictions",
                      "Entries evicted for room (Redis: evicted_keys of the whole server).", cache["evictions"])  # fmt: skip
        yield counter("deltavision_cache_errors", "Cache calls that failed; the request was computed instead.",
                      cache["errors"])  # fmt: skip
        yield gauge("deltavision_cache_bytes", "Bytes the cache holds (Redis: used_memory).", cache["bytes"])
        yield gauge("deltavision_cache_max_bytes", "The cache's memory bound (Redis: maxmemory).", cache["max_bytes"])
        yield gauge("deltavision_cache_reachable", "1 while the cache answers, 0 while degraded.",
                    cache.get("reachable", 1))  # fmt: skip
        yield counter("deltavision_images_received", "Images received in feature requests.", state["images_received"])
        yield counter("deltavision_requests_rejected", "Requests refused with a 4xx error.", state["rejected"])
