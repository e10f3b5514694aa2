"""Per-request bookkeeping as plain ASGI: request id, latency and status metrics, one JSON access-log line."""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.front_door import protocol_of
from service.metrics import Metrics
from service.tracing import PROPAGATED, Tracing

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


def request_arrival(request: Request) -> float:
    """When the request reached the app (``time.monotonic()``): the origin of its deadline."""
    arrived: float = request.state.arrived
    return arrived


class RequestContextMiddleware:
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
        request_id = incoming if _VALID_ID.match(incoming) else uuid.uuid4().hex
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["arrived"] = time.monotonic()
        status = 500
        unread_large_body = _large_or_unknown_body(headers)
        if self.tracing is not None:
            carrier = {
                name: headers[name.encode()].decode("latin-1") for name in PROPAGATED if name.encode() in headers
            }
            trace = self.tracing.start_request(f"{scope['method']} {scope['path']}", carrier, {})
            state["trace"], state["trace_id"] = trace, trace.trace_id

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
            self._record(scope, state, status, time.perf_counter() - started, request_id)

    def _record(self, scope: Scope, state: dict[str, Any], status: int, elapsed: float, request_id: str) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or (scope["path"] if scope["path"] in self.fixed_paths else "unmatched")
        record_request(
            self.metrics, self.access_log, RequestRecord(
                request_id, scope["method"], scope["path"], endpoint, protocol_of(scope["path"]), status, elapsed,
                state.get("model", ""), state.get("version", ""), state.get("stats"), state.get("error_code"),
                state.get("trace_id"), inference=state.get("inference", False),
            ),
        )  # fmt: skip
        trace = state.get("trace")
        if trace is not None:
            attributes = {
                "http.route": endpoint,
                "deit.model": state.get("model", ""),
                "deit.version": state.get("version", ""),
            }
            trace.end(f"{scope['method']} {endpoint}", status, attributes)


@dataclass
class RequestRecord:
    """What one request's metrics and log line say, whichever transport carried it (HTTP, gRPC)."""

    request_id: str
    method: str
    path: str
    endpoint: str
    protocol: str
    status: int
    elapsed: float
    model: str = ""
    version: str = ""
    stats: Any = None  # the engine's RequestStats, once the request was admitted
    error_code: str | None = None
    trace_id: str | None = None
    inference: bool = False  # a request to run the model (counted in the inference series), once it named one
    extra: dict[str, Any] = field(default_factory=dict)


def record_request(metrics: Metrics, access_log: bool, r: RequestRecord) -> None:
    """The request counters and duration, and one JSON access-log line (health and metrics probes excepted)."""
    metrics.requests.labels(r.model, r.version, r.endpoint, str(r.status), r.protocol).inc()
    metrics.request_duration.labels(r.model, r.version, r.endpoint, r.protocol).observe(r.elapsed)
    if r.inference:
        metrics.inference_duration.labels(r.model, r.version, r.protocol, str(r.status)).observe(r.elapsed)
    if not access_log or r.endpoint in ("/healthz", "/readyz", "/metrics"):
        return
    extra: dict[str, Any] = {
        "request_id": r.request_id,
        "method": r.method,
        "path": r.path,
        "status": r.status,
        "duration_ms": round(r.elapsed * 1000, 2),
        "model": r.model or None,
        "version": r.version or None,
        "protocol": r.protocol,
    }
    if r.trace_id is not None:
        extra["trace_id"] = r.trace_id
    if r.stats is not None:
        extra.update(
            images=r.stats.images,
            batch_size=list(r.stats.batch_sizes),
            queue_ms=round(r.stats.queue_ms, 2),
            inference_ms=round(r.stats.inference_ms, 2),
        )
    if r.error_code is not None:
        extra["error"] = r.error_code
    extra.update(r.extra)
    log.info("request", extra=extra)
