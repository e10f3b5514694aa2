"""Graceful shutdown of a real ``deit-serve`` process on SIGTERM and SIGINT: readiness drops at once, new work is
refused (over HTTP and gRPC), every accepted request is answered, and the process exits 0 within the drain timeout
(bounded even when the work outlasts it: queued images, an upload still being read). Each test ends its server, so
each starts its own."""

from __future__ import annotations

import signal
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from harness.load import sample_images
from tests.profiles import grpc_address, grpc_bytes_input, start_grpc_call
from tests.serving import (
    ServerProcess,
    free_port,
    multipart,
    noise_image_bytes,
    read_answer,
    run_server,
    scrape,
    wait_until,
)

MODEL = "slow"


def post(server: ServerProcess, images: list[bytes]) -> httpx.Response:
    return httpx.post(f"{server.url}/classify", files=multipart(images), timeout=60)


def decoded(server: ServerProcess) -> float:
    return scrape(server).value("deit_preprocess_duration_seconds_count", model=MODEL)


def accept_requests(
    server: ServerProcess, pool: ThreadPoolExecutor, count: int, images: int
) -> list[Future[httpx.Response]]:
    """Send ``count`` requests and return once all their images are decoded (accepted, queued or running)."""
    before = decoded(server)
    futures = [pool.submit(post, server, sample_images(images)) for _ in range(count)]
    wait_until(lambda: decoded(server) >= before + count * images, what="requests accepted")
    return futures


def stall_an_upload(server: ServerProcess) -> socket.socket:
    """A connection whose request declares 100 000 body bytes and sends 1000: the server is reading it."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
    sock.sendall(bytes(1000))
    wait_until(lambda: scrape(server).value("deit_upload_bytes_in_flight") > 0, what="upload being read")
    return sock


def draining(server: ServerProcess) -> bool:
    return httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503


def assert_json_log(server: ServerProcess) -> None:
    log = server.log()
    assert "Traceback" not in log
    assert "Exception in ASGI application" not in log
    assert all(line.startswith("{") for line in log.splitlines() if line.strip()), log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_drain_answers_accepted_requests_and_grpc_calls_refuses_new_ones_and_exits_0(
    slow_store: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """Three HTTP requests and a gRPC call in flight at the signal: all answered; a new request on either front door
    is refused while the process drains."""
    drain_timeout = 20.0
    env = {
        "DEIT_MAX_BATCH_SIZE": "1",
        "DEIT_TORCH_THREADS": "1",
        "DEIT_DRAIN_TIMEOUT_S": str(drain_timeout),
        "DEIT_GRPC_PORT": str(free_port()),
    }
    call_images = [noise_image_bytes(seed, (96, 96), "JPEG") for seed in range(16)]
    with (
        run_server(slow_store, tmp_path, env=env) as server,
        ThreadPoolExecutor(4) as pool,
        triton.InferenceServerClient(grpc_address(server)) as client,
    ):
        before = decoded(server)
        call = start_grpc_call(client, MODEL, call_images)
        wait_until(lambda: decoded(server) >= before + len(call_images), what="the gRPC call accepted")
        accepted = accept_requests(server, pool, count=3, images=8)
        signalled = time.monotonic()
        server.terminate(sig)

        wait_until(lambda: draining(server), timeout=1.0, what="/readyz 503")
        refused = post(server, sample_images(1))
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, [grpc_bytes_input(call_images[:1])])
        refused_call = caught.value
        assert not all(f.done() for f in accepted), "the accepted work finished before the drain was observed"
        health = httpx.get(f"{server.url}/healthz", timeout=5)

        answers = [f.result() for f in accepted]
        called = call.result(timeout=drain_timeout)
        code = server.wait(timeout=drain_timeout + 10)
        exited_after = time.monotonic() - signalled

    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["Retry-After"] == "1"
    assert refused_call.status() == "StatusCode.UNAVAILABLE"
    assert "shutting down" in (refused_call.message() or "")
    assert health.status_code == 200, "the process is alive while it drains"
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all(len(a.json()["results"]) == 8 for a in answers)
    assert called.as_numpy("probabilities").shape == (len(call_images), 10)
    assert code == 0
    assert exited_after < drain_timeout
    messages = [r.get("message") for r in server.log_records()]
    assert "draining" in messages
    assert "drained" in messages


def test_a_drain_that_outlasts_its_timeout_answers_requests_and_uploads_503_and_exits_0_in_bounded_time(
    slow_store: Path, tmp_path: Path
) -> None:
    """Requests whose images take seconds and an upload stalled mid-body are in flight at SIGTERM: when the drain
    timeout passes, each is answered 503 in JSON, and the process exits 0 soon after."""
    drain_timeout = 0.5
    # One float32 image per forward pass, one pass at a time: each request's 64 images take about a second or more
    # (tens of ms each, even on CPUs with fast bf16 units), well past the drain.
    env = {
        "DEIT_MAX_BATCH_SIZE": "1",
        "DEIT_TORCH_THREADS": "1",
        "DEIT_FORWARD_WORKERS": "1",
        "DEIT_DTYPE": "float32",
        "DEIT_DRAIN_TIMEOUT_S": str(drain_timeout),
    }
    with run_server(slow_store, tmp_path, env=env) as server, ThreadPoolExecutor(4) as pool:
        accepted = accept_requests(server, pool, count=3, images=64)
        upload = stall_an_upload(server)
        signalled = time.monotonic()
        server.terminate(signal.SIGTERM)
        with upload:
            status, body = read_answer(upload)
            upload_answered_after = time.monotonic() - signalled
        code = server.wait(timeout=30)
        exited_after = time.monotonic() - signalled
        answers = [f.result() for f in accepted]

    assert code == 0
    assert exited_after < drain_timeout + 3.0, exited_after
    # Work that could not finish is answered "retry elsewhere", not cut off or failed with a 500.
    assert {a.status_code for a in answers} == {503}, [a.text for a in answers]
    assert {a.json()["error"]["code"] for a in answers} == {"shutting_down"}
    assert all(a.headers["Retry-After"] == "1" for a in answers)
    assert (status, body["error"]["code"]) == (503, "shutting_down"), body
    assert upload_answered_after < 3.0, upload_answered_after
    records = server.log_records()
    in_flight = len(accepted) + 1  # the requests and the upload
    assert any(r.get("message") == f"drain timeout passed with {in_flight} requests in flight" for r in records)
    assert not [r for r in records if r.get("level") == "error"], "a timed-out drain is not an error"
    assert_json_log(server)


def test_an_upload_still_being_read_at_a_second_signal_gets_503_json(tiny_store: Path, tmp_path: Path) -> None:
    """A client stalled mid-body is answered ``shutting_down`` at once when a second signal ends the drain."""
    env = {"DEIT_DRAIN_TIMEOUT_S": "1"}
    with run_server(tiny_store, tmp_path, env=env) as server:
        with stall_an_upload(server) as sock:
            signalled = time.monotonic()
            server.terminate(signal.SIGTERM)
            wait_until(lambda: draining(server), timeout=1.0, what="the drain begun")
            server.terminate(signal.SIGTERM)
            status, body = read_answer(sock)
            answered_after = time.monotonic() - signalled
        code = server.wait(timeout=30)
    assert (status, body["error"]["code"]) == (503, "shutting_down"), body
    assert answered_after < 1.5, answered_after
    assert code == 0
    assert_json_log(server)
