"""Prometheus metrics of the service (``GET /metrics``, text exposition format).

Request counts by endpoint (the route's template, so ids do not make new series), method
and status; latency histograms by endpoint and method; images encoded, added and deleted;
and the gallery's size and generation, read from the index at every scrape. With several
worker processes (``rmgl serve --workers N``) the counters and histograms of all workers
are summed through prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
set by ``rmgl serve``); the gallery gauges come from the worker that answers the scrape,
which refreshes its index first, so they are the same in every worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

__all__ = ["CONTENT_TYPE", "ServiceMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# seconds: an embedding of one crop takes ~10 ms, a search of 1M items ~50 ms, a commit more
BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _GalleryCollector:
    """The gallery's live and deleted items and its generation, read at scrape time."""

    def __init__(self, info: Callable[[], dict]) -> None:
        self.info = info

    def describe(self) -> Iterator[Metric]:
        """The metrics' names without reading the index (the registry asks at start-up)."""
        return self._families()

    def collect(self) -> Iterator[Metric]:
        return self._families(self.info())

    def _families(self, info: dict | None = None) -> Iterator[Metric]:
        items = GaugeMetricFamily(
            "rmgl_gallery_items", "Items of the gallery index", labels=["state"]
        )
        generation = GaugeMetricFamily(
            "rmgl_gallery_generation", "Commits of the gallery index so far"
        )
        if info is not None:
            items.add_metric(["live"], info["live"])
            items.add_metric(["deleted"], info["deleted"])
            generation.add_metric([], info["generation"])
        yield items
        yield generation


class ServiceMetrics:
    """The service's metrics in their own registry (several apps may live in one process)."""

    def __init__(self, gallery_info: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "rmgl_http_requests",
            "HTTP requests answered, by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "rmgl_http_request_duration_seconds",
            "Time from the request's arrival to the end of its response",
            ["endpoint", "method"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.images = Counter(
            "rmgl_images",
            "Images encoded, added to and deleted from the gallery",
            ["action"],
            registry=self.registry,
        )
        self._gallery = _GalleryCollector(gallery_info)
        self.registry.register(self._gallery)

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint, method).observe(seconds)

    def exposition(self) -> bytes:
        path = os.environ.get(MULTIPROCESS_ENV)
        if not path:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path)
        registry.register(self._gallery)
        return generate_latest(registry)
