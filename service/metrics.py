"""The Prometheus metrics, all in one place. They say what HTTP metrics cannot: queue vs compute time,
batch sizes, queue depth, failures by reason."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """One registry per app, so tests and several apps in one process do not share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "vae_requests_total", "HTTP requests by endpoint, model and status", ["endpoint", "model", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "vae_request_duration_seconds", "HTTP request latency", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "vae_queue_wait_seconds", "time a batch item waited before its model call", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.compute_seconds = Histogram(
            "vae_compute_seconds", "time of one batched model call", ["model", "op"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "vae_batch_size_images", "images per model call", ["model", "op"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("vae_queue_depth_images", "images waiting for a model call", ["model", "op"], registry=r)
        self.images = Counter("vae_images_generated_total", "images decoded and returned", ["model"], registry=r)
        self.failures = Counter(
            "vae_failures_total", "failed requests by reason: rejected, timeout, invalid, internal", ["reason"], registry=r
        )
        self.model_info = Info("vae_model", "a served model", ["model"], registry=r)
        self.model_ready = Gauge("vae_model_ready", "1 when the model loaded and passed warm-up", ["model"], registry=r)
