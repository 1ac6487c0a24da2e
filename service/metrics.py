"""The Prometheus metrics, all in one place. They say what HTTP metrics cannot: queue vs compute time,
batch sizes, queue depth, failures by reason.

With several worker processes (VAE_WORKERS), `vae-serve` sets PROMETHEUS_MULTIPROC_DIR before any worker starts:
each worker then writes its values to files there, and /metrics, whichever worker answers it, adds them all up.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """One registry per app, so tests and several apps in one process do not share counters."""

    def __init__(self) -> None:
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = CollectorRegistry()
        r = self.registry
        if not self.multiprocess:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        else:  # the collectors above would describe whichever worker answers; these two add up every worker
            self.process_memory = Gauge(
                "process_resident_memory_bytes", "resident memory of the server's worker processes", registry=r,
                multiprocess_mode="livesum",
            )
            self.process_cpu = Counter("process_cpu_seconds", "CPU time of the server's worker processes", registry=r)
            self._cpu_counted = 0.0
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
        self.batches = Counter(
            "vae_batches_total", "model calls by where they ran: the model thread (every torch thread) or, under load "
            "on a CPU, a single-thread lane", ["model", "op", "thread"], registry=r,
        )
        self.queue_depth = Gauge(
            "vae_queue_depth_images", "images waiting for a model call", ["model", "op"], registry=r,
            multiprocess_mode="livesum",
        )
        self.images = Counter("vae_images_generated_total", "images decoded and returned", ["model"], registry=r)
        self.failures = Counter(
            "vae_failures_total", "failed requests by reason: rejected, timeout, invalid, internal, disconnected", ["reason"], registry=r
        )
        self.connections_open = Gauge(
            "vae_connections_open", "client connections open; requests on those beyond vae_connections_max get 503",
            registry=r, multiprocess_mode="livesum",
        )
        self.connections_max = Gauge(
            "vae_connections_max", "client connections served at once (VAE_MAX_CONNECTIONS, per worker: summed)",
            registry=r, multiprocess_mode="livesum",
        )
        self.connections_timed_out = Counter(
            "vae_connections_timed_out_total", "connections closed because their request did not come, or their answer "
            "was not read, in time (VAE_READ_TIMEOUT_S): silent or slow clients", registry=r,
        )
        self.model_ready = Gauge(
            "vae_model_ready", "1 when the model loaded and passed warm-up (in every worker)", ["model"], registry=r,
            multiprocess_mode="livemin",
        )
        # An Info keeps its labels in the process, not in PROMETHEUS_MULTIPROC_DIR: every worker shows its own,
        # which are the same (the same artifacts on the same device).
        self.info_registry = CollectorRegistry()
        self.model_info = Info("vae_model", "a served model", ["model"], registry=self.info_registry)

    def sample_process(self) -> None:
        """With several workers: record this worker's resident memory and CPU time (each worker, every few seconds)."""
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / _CLOCK_TICKS  # utime + stime
        self.process_cpu.inc(cpu - self._cpu_counted)
        self._cpu_counted = cpu
        self.process_memory.set(int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE_BYTES)

    def collect(self) -> Iterator[Metric]:
        """Every metric family this process defines."""
        yield from self.registry.collect()
        yield from self.info_registry.collect()

    def exposition(self) -> bytes:
        """The text format: this process's metrics, or every worker's added up."""
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry) + generate_latest(self.info_registry)
        return generate_latest(self.registry) + generate_latest(self.info_registry)
