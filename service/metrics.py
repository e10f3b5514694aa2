"""Every Prometheus metric of the service, declared in one place with explicit buckets, on a per-app registry."""

from __future__ import annotations

import copy
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Milliseconds to tens of seconds: covers a cached tiny model on GPU up to a queued base model on CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the max batch size, plus the max itself, so every size 1…max lands in a tight bucket."""
    buckets = {1.0, float(max_batch_size)}
    b = 2
    while b < max_batch_size:
        buckets.add(float(b))
        b *= 2
    return tuple(sorted(buckets))


# The series one model version's queue, forward passes and decoding record (see ``Metrics.for_version``).
PER_VERSION = (
    "queue_wait", "batch_size", "forward_duration", "preprocess_duration", "decoded", "queue_depth", "images",
    "rejected", "dropped", "batch_failures", "nonfinite_outputs", "batch_executions", "batch_seconds",
    "last_inference",
)  # fmt: skip


class _WithVersion:
    """A metric whose ``labels(model, *rest)`` fills in the version after the model."""

    def __init__(self, metric: Any, version: str) -> None:
        self._metric = metric
        self._version = version

    def labels(self, model: str, *rest: str) -> Any:
        return self._metric.labels(model, self._version, *rest)


class Metrics:
    """Owns a registry so that several apps (tests, workers) never share or collide on global state."""

    def __init__(self, max_batch_size: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # protocol: the front door ("native", "v2" for the Open Inference Protocol, "hf" for the Hugging Face API),
        # so that one selector covers all of a protocol's routes; it follows from the path, adding no series.
        self.requests = Counter(
            "deit_requests", "HTTP requests by model, version, endpoint, status code and protocol",
            ["model", "version", "endpoint", "status", "protocol"], registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "deit_request_duration_seconds", "Time from request start to response, by model, version, endpoint and "
            "protocol", ["model", "version", "endpoint", "protocol"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "deit_queue_wait_seconds", "Time an image waited in the queue before its batch ran", ["model", "version"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "deit_batch_size", "Images per forward pass", ["model", "version"],
            buckets=batch_size_buckets(max_batch_size), registry=r,
        )  # fmt: skip
        self.forward_duration = Histogram(
            "deit_forward_duration_seconds", "Duration of one batched forward pass", ["model", "version"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.preprocess_duration = Histogram(
            "deit_preprocess_duration_seconds", "Decode + preprocess time of one image", ["model", "version"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.decoded = Counter(
            "deit_decoded_images", "Uploaded images decoded and preprocessed, by where: cpu, or device "
            "(--preprocess-device)", ["model", "version", "path"], registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("deit_queue_depth", "Images waiting for a batch", ["model", "version"], registry=r)
        self.images = Counter(
            "deit_images", "Images run through a forward pass (classify and embed alike)", ["model", "version"],
            registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "deit_rejected", "Requests refused before inference, by reason", ["model", "version", "reason"], registry=r
        )
        self.dropped = Counter(
            "deit_dropped",
            "Images of stopped requests that never ran (not decoded, or withdrawn from the queue), by reason",
            ["model", "version", "reason"],
            registry=r,
        )
        self.batch_failures = Counter(
            "deit_batch_failures", "Forward passes that raised", ["model", "version"], registry=r
        )
        self.nonfinite_outputs = Counter(
            "deit_nonfinite_outputs", "Images whose scores came out NaN or infinite (answered 500)",
            ["model", "version"], registry=r,
        )  # fmt: skip
        # Triton's statistics extension (GET /v2/models/stats, gRPC ModelStatistics) reads these series, the
        # histograms above (queue wait, preprocessing) and the request counters below, so /metrics tells the same.
        self.batch_executions = Counter(
            "deit_batch_executions", "Forward passes by batch size (the statistics' batch_stats)",
            ["model", "version", "batch_size"], registry=r,
        )  # fmt: skip
        self.batch_seconds = Counter(
            "deit_batch_seconds", "Seconds of forward passes (phase infer) and of splitting their outputs per image "
            "(phase output), by batch size", ["model", "version", "batch_size", "phase"], registry=r,
        )  # fmt: skip
        self.last_inference = Gauge(
            "deit_last_inference_timestamp_seconds", "When the model version's last forward pass ended (Unix time)",
            ["model", "version"], registry=r,
        )  # fmt: skip
        # Every front door's inference requests in one series (/classify, /embed, V2 infer over REST and gRPC,
        # Hugging Face), admitted or refused at admission: what dashboards and autoscaling count.
        self.inference_duration = Histogram(
            "deit_inference_request_duration_seconds", "Time from arrival to answer of inference requests, every "
            "front door, by model, version, protocol and status", ["model", "version", "protocol", "status"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "deit_model_info",
            "Loaded model versions (value 1), their hub model, the runtime serving each and its precision",
            ["model", "version", "architecture", "dtype", "device", "hub_id", "revision", "runtime", "precision"],
            registry=r,
        )
        self.inflight = Gauge("deit_inflight_requests", "Requests being handled", registry=r)
        self.upload_bytes = Gauge(
            "deit_upload_bytes_in_flight", "Request-body bytes reserved by requests in flight", registry=r
        )
        self.ready = Gauge("deit_ready", "1 when every model is loaded and warm and the service is not draining",
                           registry=r)  # fmt: skip
        # The per-version series are recorded through ``labels(model, ...)`` by code that knows only its model (a
        # batcher, a served model): the version label is filled in, "1" here, the loaded version's in ``for_version``.
        self._per_version = {name: getattr(self, name) for name in PER_VERSION}
        for name, metric in self._per_version.items():
            setattr(self, name, _WithVersion(metric, "1"))

    def for_version(self, version: str) -> Metrics:
        """The same metrics, as one model version records them: its batcher and decoding name only the model, and
        the version label is added to each series, so that two versions of a model never share a queue gauge."""
        view = copy.copy(self)
        for name in PER_VERSION:
            setattr(view, name, _WithVersion(self._per_version[name], version))
        return view
