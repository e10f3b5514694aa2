"""OpenTelemetry traces, opt-in (``--otlp-endpoint``): a server span per request (its parent the client's W3C
``traceparent``/``tracestate``, over HTTP or gRPC), with children for reading the body, decoding, each image's wait
in the queue and the forward pass its batch ran in (the queue spans link to the batch's forward span).

opentelemetry is imported only when tracing is on (the ``tracing`` extra); when it is off every hook here is a
``None`` check, so the engine and front doors pay nothing.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from service import __version__

PROPAGATED = ("traceparent", "tracestate")  # the W3C trace-context headers (gRPC metadata keys alike)


class Tracing:
    """The tracer provider and its OTLP exporter: OTLP/HTTP, or gRPC where ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``
    or ``OTEL_EXPORTER_OTLP_PROTOCOL`` says ``grpc``; the SDK reads the other ``OTEL_*`` variables (sampler,
    batching, headers, resource attributes, service name)."""

    def __init__(self, endpoint: str) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        attributes = {"service.version": __version__}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = "deit-serve"
        self._provider = TracerProvider(resource=Resource.create(attributes))
        self._provider.add_span_processor(BatchSpanProcessor(_exporter(endpoint)))
        self._tracer = self._provider.get_tracer("deit-serve", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._api = trace

    def start_request(self, name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any]) -> RequestTrace:
        """The server span of a request, child of the client's span when ``carrier`` holds a ``traceparent``."""
        parent = self._propagator.extract(carrier={k: v for k, v in carrier.items() if k in PROPAGATED})
        span = self._tracer.start_span(name, context=parent, kind=self._api.SpanKind.SERVER, attributes=attributes)
        return RequestTrace(self, span)

    def batch(
        self,
        requests: Sequence[tuple[RequestTrace, float]],
        started_ns: int,
        ended_ns: int,
        attributes: Mapping[str, Any],
    ) -> None:
        """One forward pass: its span (a child of the first traced request in it), and each traced image's queue
        span (``(trace, queued_ns)``: from its enqueueing to the batch's start), linked to the forward span."""
        first = requests[0][0]
        forward = self._tracer.start_span(
            "forward", context=self._api.set_span_in_context(first.span), attributes=attributes, start_time=started_ns
        )
        forward.end(end_time=ended_ns)
        link = self._api.Link(forward.get_span_context(), {"batch_size": attributes.get("batch_size", 0)})
        for trace, queued_ns in requests:
            queue = self._tracer.start_span(
                "queue", context=self._api.set_span_in_context(trace.span), links=[link],
                start_time=int(queued_ns), attributes={"model": attributes.get("model", "")},
            )  # fmt: skip
            queue.end(end_time=started_ns)

    def shutdown(self) -> None:
        """Export the spans still buffered, then stop."""
        self._provider.shutdown()


class RequestTrace:
    """One request's server span; the stages of the request add children to it."""

    def __init__(self, tracing: Tracing, span: Any) -> None:
        self.tracing = tracing
        self.span = span
        self.trace_id = format(span.get_span_context().trace_id, "032x")

    @contextlib.contextmanager
    def child(self, name: str, attributes: Mapping[str, Any]) -> Iterator[None]:
        api = self.tracing._api
        with self.tracing._tracer.start_as_current_span(
            name, context=api.set_span_in_context(self.span), attributes=attributes
        ):
            yield

    def end(self, name: str, status: int, attributes: Mapping[str, Any]) -> None:
        self.span.update_name(name)
        self.span.set_attributes({**attributes, "http.response.status_code": status})
        if status >= 500:
            self.span.set_status(self.tracing._api.Status(self.tracing._api.StatusCode.ERROR))
        self.span.end()


def span(trace: RequestTrace | None, name: str, **attributes: Any) -> contextlib.AbstractContextManager[None]:
    """A child span of the request's, or nothing when the request is not traced."""
    return contextlib.nullcontext() if trace is None else trace.child(name, attributes)


def wall_ns(monotonic_s: float) -> int:
    """A ``time.monotonic()`` instant as Unix nanoseconds (span times are wall-clock)."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def _exporter(endpoint: str) -> Any:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    if not urlsplit(endpoint).path.strip("/"):  # a collector's address: its OTLP/HTTP traces path
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=endpoint)
