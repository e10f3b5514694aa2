"""The access log as plain ASGI: request id, latency and status metrics, one JSON line per request; the front door
that admits a request fills in its typed ``RequestRecord`` (model, version, batching, error code). The gRPC front
door records its calls through the same ``record_request``."""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.front_door import protocol_of
from service.metrics import Metrics
from service.tracing import PROPAGATED, RequestTrace, Tracing

# Health and metrics probes: counted, but neither logged nor traced.
PROBES = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})

log = logging.getLogger("deit_serve.access")

_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# An answer given before a body larger than this (or of unknown length) was read closes the connection: kept open,
# the server would go on reading, and discarding, an upload it has refused. A smaller rest is discarded on a kept
# connection, so that the client reads the answer instead of a reset (closing with unread data sends a TCP RST).
DISCARD_LIMIT_BYTES = 1024 * 1024


def _large_or_unknown_body(headers: dict[bytes, bytes]) -> bool:
    if b"transfer-encoding" in headers:
        return True
    declared = headers.get(b"content-length", b"0")
    return not declared.isdigit() or int(declared) > DISCARD_LIMIT_BYTES


class Batching(Protocol):
    """What a request saw of batching (the engine's ``RequestStats``), for its log line."""

    images: int
    batch_sizes: tuple[int, ...]
    queue_ms: float
    inference_ms: float


@dataclass
class RequestRecord:
    """One request as the access log and the request metrics tell it, whichever transport carried it (HTTP, gRPC):
    made on arrival, filled in by the front door that admits it (model, version, batching, whether it runs the
    model) and by the error handlers (error code)."""

    request_id: str
    arrived: float  # time.monotonic() on arrival: the origin of the request's deadline
    model: str = ""
    version: str = ""
    batching: Batching | None = None
    error_code: str | None = None
    inference: bool = False  # a request to run the model (the inference series counts it), once it named one
    trace: RequestTrace | None = None  # its server span, when tracing is on


def request_id_of(incoming: str) -> str:
    """The client's request id (``X-Request-Id``, or the call's ``x-request-id`` metadata) when it is a sane one,
    else a new one."""
    return incoming if _VALID_ID.match(incoming) else uuid.uuid4().hex


def request_record(request: Request) -> RequestRecord:
    record: RequestRecord = request.state.record
    return record


def request_arrival(request: Request) -> float:
    """When the request reached the app (``time.monotonic()``): the origin of its deadline."""
    return request_record(request).arrived


class AccessLogMiddleware:
    """Request id (echoed, or made), request metrics by route, and the access log line of every request."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, access_log: bool, fixed_paths: frozenset[str] = frozenset(),
        tracing: Tracing | None = None,
    ) -> None:  # fmt: skip
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.fixed_paths = fixed_paths  # routes without path parameters, labelled by their path when unmarked
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = request_id_of(incoming)
        record = RequestRecord(request_id, time.monotonic())
        scope.setdefault("state", {})["record"] = record
        status = 500
        unread_large_body = _large_or_unknown_body(headers)
        if self.tracing is not None and scope["path"] not in PROBES:  # a probe every few seconds is no trace
            carrier = {
                name: headers[name.encode()].decode("latin-1") for name in PROPAGATED if name.encode() in headers
            }
            record.trace = self.tracing.start_request(f"{scope['method']} {scope['path']}", carrier, {})

        async def receive_body() -> Message:
            nonlocal unread_large_body
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                unread_large_body = False
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                sent_headers = list(message.get("headers", ()))
                added = [(b"x-request-id", request_id.encode())]
                if unread_large_body and not any(name.lower() == b"connection" for name, _ in sent_headers):
                    added.append((b"connection", b"close"))
                message["headers"] = [*sent_headers, *added]
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive_body, send_with_id)
        finally:
            self.metrics.inflight.dec()
            self._record(scope, record, status, time.perf_counter() - started)

    def _record(self, scope: Scope, record: RequestRecord, status: int, elapsed: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or (scope["path"] if scope["path"] in self.fixed_paths else "unmatched")
        record_request(
            self.metrics, self.access_log, record, method=scope["method"], path=scope["path"], endpoint=endpoint,
            protocol=protocol_of(scope["path"]), status=status, elapsed=elapsed,
        )  # fmt: skip
        if record.trace is not None:
            attributes = {"http.route": endpoint, "deit.model": record.model, "deit.version": record.version}
            record.trace.end(f"{scope['method']} {endpoint}", status, attributes)


def record_request(
    metrics: Metrics, access_log: bool, record: RequestRecord, *, method: str, path: str, endpoint: str,
    protocol: str, status: int, elapsed: float,
) -> None:  # fmt: skip
    """The request counters and duration (and the inference series for a request that runs the model), and one
    JSON access-log line (health and metrics probes excepted), whichever transport carried the request."""
    model, version = record.model, record.version
    metrics.requests.labels(model, version, endpoint, str(status), protocol).inc()
    metrics.request_duration.labels(model, version, endpoint, protocol).observe(elapsed)
    if record.inference:
        metrics.inference_duration.labels(model, version, protocol, str(status)).observe(elapsed)
    if not access_log or endpoint in PROBES:
        return
    stats = record.batching
    extra: dict[str, Any] = {
        "request_id": record.request_id,
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(elapsed * 1000, 2),
        "model": model or None,
        "version": version or None,
        "protocol": protocol,
    }
    if record.trace is not None:
        extra["trace_id"] = record.trace.trace_id
    if stats is not None:
        extra.update(
            images=stats.images,
            batch_size=list(stats.batch_sizes),
            queue_ms=round(stats.queue_ms, 3),
            inference_ms=round(stats.inference_ms, 3),
        )
    if record.error_code is not None:
        extra["error"] = record.error_code
    log.info("request", extra=extra)
