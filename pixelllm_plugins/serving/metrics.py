"""Prometheus metrics of the worker: a registry per app, so several apps can live in one process; with
``multiprocess=True`` (the fronts of ``pixelllm serve --fronts N``) values are kept in files under
``PROMETHEUS_MULTIPROC_DIR`` and ``render`` adds them up over all fronts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["WorkerMetrics", "CONTENT_TYPE_LATEST"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, multiprocess: bool = False):
        self.registry = registry or CollectorRegistry()
        self.multiprocess = multiprocess
        r = self.registry
        self.requests = Counter("pixelllm_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("pixelllm_request_seconds", "request latency (receive to answer), by route",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("pixelllm_rejected", "requests refused before inference, by reason "
                                "(queue_full, not_ready, timeout)", ["reason"], registry=r)
        self.batch_size = Histogram("pixelllm_batch_size", "images per model call, by task", ["task"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.inference = Histogram("pixelllm_inference_seconds", "seconds per model call, by task", ["task"],
                                   buckets=_LATENCY_BUCKETS, registry=r)
        # multiprocess_mode: how the fronts' values combine (ignored in one process)
        self.in_flight = Gauge("pixelllm_in_flight", "requests admitted and not yet answered", registry=r,
                               multiprocess_mode="livesum")
        self.queue_depth = Gauge("pixelllm_queue_depth", "requests waiting for the inference thread",
                                 registry=r, multiprocess_mode="livesum")
        self.ready = Gauge("pixelllm_ready", "1 once the model is loaded", registry=r,
                           multiprocess_mode="livemax")
        self.adapter_loads = Counter("pixelllm_adapter_loads", "LoRA adapters loaded on demand", registry=r)

    def observe_batch(self, task: str, size: int, seconds: float) -> None:
        self.batch_size.labels(task).observe(size)
        self.inference.labels(task).observe(seconds)

    def render(self) -> bytes:
        if self.multiprocess:
            from prometheus_client import multiprocess

            combined = CollectorRegistry()
            multiprocess.MultiProcessCollector(combined)
            return generate_latest(combined)
        return generate_latest(self.registry)
