"""OpenTelemetry traces on a real server process, received by an OTLP/HTTP receiver on loopback that decodes the
protobuf with opentelemetry-proto: a client's W3C trace context is the parent of our spans, over REST and gRPC, and
nothing of OpenTelemetry is loaded when tracing is off."""

from __future__ import annotations

import ast
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from harness.launcher import free_port
from tests.serving import ServerProcess, image_bytes, run_server, wait_until

SERVER_SPAN = Span.SpanKind.SPAN_KIND_SERVER


class Receiver:
    """Spans exported to ``url`` over OTLP/HTTP (protobuf), kept in arrival order."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for resource in request.resource_spans:
                        for scope in resource.scope_spans:
                            receiver.spans.extend(scope.spans)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)
        self.thread.start()

    def of_trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id.hex() == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def traced(tiny_store: Path, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """This module's own server (no other test exports to its receiver), stopped with the module so that it holds
    no place among the shared servers."""
    env = {
        "DEIT_DEVICE": "cpu", "DEIT_OTLP_ENDPOINT": receiver.url, "DEIT_GRPC_PORT": str(free_port()),
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export every 50 ms, not 5 s
    }  # fmt: skip
    with run_server(tiny_store, tmp_path_factory.mktemp("traced"), env=env) as server:
        yield server


def client_context() -> tuple[str, str, str]:
    """A trace id and span id as a client's own span would have them, and its ``traceparent``."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def spans_of(receiver: Receiver, trace_id: str, names: set[str]) -> dict[str, Span]:
    wait_until(lambda: names <= {s.name for s in receiver.of_trace(trace_id)}, timeout=30, what=f"spans {names}")
    return {s.name: s for s in receiver.of_trace(trace_id)}


def attributes(span: Span) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        values[kv.key] = getattr(kv.value, kind) if kind else None
    return values


def test_rest_request_spans_are_children_of_the_clients(traced: ServerProcess, receiver: Receiver) -> None:
    for probe in ("/healthz", "/v2/health/live", "/v2/health/ready", "/metrics"):  # not traced (checked below)
        assert httpx.get(f"{traced.url}{probe}", timeout=10).status_code == 200
    trace_id, client_span, traceparent = client_context()
    headers = {"traceparent": traceparent, "tracestate": "vendor=1", "x-request-id": "traced-rest-1"}
    files = [("file", ("a.png", image_bytes(), "image/png"))]
    assert httpx.post(f"{traced.url}/classify", files=files, headers=headers, timeout=30).status_code == 200
    spans = spans_of(receiver, trace_id, {"POST /classify", "read body", "decode", "queue", "forward"})
    request = spans["POST /classify"]
    assert request.kind == SERVER_SPAN
    assert request.parent_span_id.hex() == client_span  # the client's span is our request's parent
    assert request.trace_state == "vendor=1"
    for child in ("read body", "decode", "queue", "forward"):
        assert spans[child].parent_span_id == request.span_id, child
    forward = attributes(spans["forward"])
    assert (forward["model"], forward["version"], forward["runtime"], forward["batch_size"]) == (
        "tiny",
        "1",
        "torch",
        1,
    )
    (link,) = spans["queue"].links
    assert link.span_id == spans["forward"].span_id  # the image's wait links to the pass it rode in
    assert attributes(request)["http.response.status_code"] == 200

    def logged() -> bool:
        return any(r.get("request_id") == "traced-rest-1" for r in traced.log_records())

    wait_until(logged, what="the access-log line")
    (line,) = [r for r in traced.log_records() if r.get("request_id") == "traced-rest-1"]
    assert line["trace_id"] == trace_id
    # The launcher's readiness polls and the probes above came first and would have been exported no later.
    with receiver.lock:
        names = {s.name for s in receiver.spans}
    probes = {"GET /readyz", "GET /healthz", "GET /v2/health/live", "GET /v2/health/ready", "GET /metrics"}
    assert not names & probes, names


def test_grpc_call_spans_are_children_of_the_clients(traced: ServerProcess, receiver: Receiver) -> None:
    from service.api.grpc import inference_pb2 as pb

    trace_id, client_span, traceparent = client_context()
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(image_bytes())
    with grpc.insecure_channel(f"127.0.0.1:{traced.env['DEIT_GRPC_PORT']}") as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        answer = infer(request, metadata=(("traceparent", traceparent),), timeout=30)
    assert answer.model_name == "tiny"
    name = "/inference.GRPCInferenceService/ModelInfer"
    spans = spans_of(receiver, trace_id, {name, "decode", "queue", "forward"})
    assert spans[name].parent_span_id.hex() == client_span
    assert attributes(spans[name])["rpc.system"] == "grpc"
    assert spans["decode"].parent_span_id == spans["queue"].parent_span_id == spans[name].span_id


def test_otlp_over_grpc_when_the_otel_protocol_says_so(tiny_store: Path, tmp_path: Path) -> None:
    """``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``: the same spans reach a collector's gRPC TraceService."""
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    received: list[Span] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:
            received.extend(span for r in request.resource_spans for scope in r.scope_spans for span in scope.spans)
            return ExportTraceServiceResponse()

    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)  # type: ignore[no-untyped-call]
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    env = {
        "DEIT_DEVICE": "cpu", "DEIT_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }  # fmt: skip
    try:
        with run_server(tiny_store, tmp_path, env=env) as server:  # its own: it exports to this test's collector
            trace_id, client_span, traceparent = client_context()
            files = [("file", ("a.png", image_bytes(), "image/png"))]
            headers = {"traceparent": traceparent}
            assert httpx.post(f"{server.url}/embed", files=files, headers=headers, timeout=30).status_code == 200
            wait_until(
                lambda: {"POST /embed", "forward"} <= {s.name for s in received if s.trace_id.hex() == trace_id},
                timeout=30, what="spans over OTLP/gRPC",
            )  # fmt: skip
    finally:
        collector.stop(grace=None)
    (request,) = [s for s in received if s.name == "POST /embed"]
    assert request.parent_span_id.hex() == client_span


def test_the_service_loads_no_opentelemetry_sdk_when_tracing_is_off(tiny_store: Path) -> None:
    """A request served end to end (load, decode, batch, forward) in a fresh process with tracing off: neither the
    SDK nor an exporter is loaded (FastAPI itself imports the OpenTelemetry API where it is installed)."""
    script = f"""
import sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
from tests.serving import image_bytes, wait_until
settings = Settings(model_store={str(tiny_store)!r}, device="cpu", grpc_port=0, access_log=False)
with TestClient(create_app(settings)) as client:
    wait_until(lambda: client.get("/readyz").status_code == 200, timeout=60, what="ready")
    answer = client.post("/classify", files=[("file", ("a.png", image_bytes(), "image/png"))])
    assert answer.status_code == 200, answer.text
print(sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEIT_", "OTEL_"))}
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_only_the_tracing_module_imports_opentelemetry_and_only_when_on() -> None:
    service = Path(__file__).resolve().parent.parent / "service"
    for path in service.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = {a.name for n in top_level if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)}
        assert not any(name.startswith("opentelemetry") for name in names), path
        if path.name != "tracing.py":
            assert "opentelemetry" not in {
                (n.module or "").split(".")[0] if isinstance(n, ast.ImportFrom) else n.names[0].name.split(".")[0]
                for n in ast.walk(tree)
                if isinstance(n, ast.Import | ast.ImportFrom)
            }, path
