"""Graceful shutdown of a real ``deit-serve`` process on SIGTERM and SIGINT: readiness drops at once, new work is
refused, every accepted request is answered, and the process exits 0 within the drain timeout (bounded even when
the work outlasts it)."""

from __future__ import annotations

import signal
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from harness.load import sample_images
from tests.serving import Scrape, ServerProcess, multipart, read_answer, run_server, wait_until

MODEL = "slow"


def post(server: ServerProcess, images: list[bytes]) -> httpx.Response:
    return httpx.post(f"{server.url}/classify", files=multipart(images), timeout=60)


def accept_requests(
    server: ServerProcess, pool: ThreadPoolExecutor, count: int, images: int
) -> list[Future[httpx.Response]]:
    """Send ``count`` requests and return once all their images are decoded (accepted, queued or running)."""
    futures = [pool.submit(post, server, sample_images(images)) for _ in range(count)]

    def decoded() -> bool:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        return Scrape.parse(text).value("deit_preprocess_duration_seconds_count", model=MODEL) >= count * images

    wait_until(decoded, what="requests accepted")
    return futures


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_drain_answers_accepted_requests_refuses_new_ones_and_exits_0(
    slow_store: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    drain_timeout = 20.0
    env = {"DEIT_MAX_BATCH_SIZE": "1", "DEIT_TORCH_THREADS": "1", "DEIT_DRAIN_TIMEOUT_S": str(drain_timeout)}
    with run_server(slow_store, tmp_path, env=env) as server, ThreadPoolExecutor(4) as pool:
        accepted = accept_requests(server, pool, count=3, images=8)
        signalled = time.monotonic()
        server.terminate(sig)

        def not_ready() -> bool:
            return httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503

        wait_until(not_ready, timeout=1.0, what="/readyz 503")
        refused = post(server, sample_images(1))
        assert not all(f.done() for f in accepted), "the accepted work finished before the drain was observed"
        health = httpx.get(f"{server.url}/healthz", timeout=5)

        answers = [f.result() for f in accepted]
        code = server.wait(timeout=drain_timeout + 10)
        exited_after = time.monotonic() - signalled

    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["Retry-After"] == "1"
    assert health.status_code == 200, "the process is alive while it drains"
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all(len(a.json()["results"]) == 8 for a in answers)
    assert code == 0
    assert exited_after < drain_timeout
    messages = [r.get("message") for r in server.log_records()]
    assert "draining" in messages
    assert "drained" in messages


def test_a_drain_that_outlasts_its_timeout_answers_503_and_exits_0_in_bounded_time(
    slow_store: Path, tmp_path: Path
) -> None:
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
        signalled = time.monotonic()
        server.terminate(signal.SIGTERM)
        code = server.wait(timeout=30)
        exited_after = time.monotonic() - signalled
        answers = [f.result() for f in accepted]

    assert code == 0
    assert exited_after < drain_timeout + 3.0, exited_after
    # Work that could not finish is answered "retry elsewhere", not cut off or failed with a 500.
    assert {a.status_code for a in answers} == {503}, [a.text for a in answers]
    assert {a.json()["error"]["code"] for a in answers} == {"shutting_down"}
    assert all(a.headers["Retry-After"] == "1" for a in answers)
    records = server.log_records()
    assert any(r.get("message") == "drain timeout passed with 3 requests in flight" for r in records)
    assert not [r for r in records if r.get("level") == "error"], "a timed-out drain is not an error"


@pytest.mark.parametrize("signals", [1, 2], ids=["drain-timeout", "second-signal"])
def test_uploads_still_being_read_when_the_drain_ends_get_503_json(
    tiny_store: Path, tmp_path: Path, signals: int
) -> None:
    """A client stalled mid-body is answered ``shutting_down`` when the drain gives up (or at a second signal)."""
    env = {"DEIT_DRAIN_TIMEOUT_S": "1"}
    with run_server(tiny_store, tmp_path, env=env) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
            )
            sock.sendall(bytes(1000))
            wait_until(
                lambda: Scrape.parse(httpx.get(f"{server.url}/metrics").text).value("deit_upload_bytes_in_flight") > 0,
                what="upload being read",
            )
            signalled = time.monotonic()
            for _ in range(signals):
                server.terminate(signal.SIGTERM)
                time.sleep(0.1)
            status, body = read_answer(sock)
            answered_after = time.monotonic() - signalled
        code = server.wait(timeout=30)
    assert (status, body["error"]["code"]) == (503, "shutting_down"), body
    assert answered_after < (3.0 if signals == 1 else 1.5), answered_after
    assert code == 0
    log = server.log()
    assert "Traceback" not in log
    assert all(line.startswith("{") for line in log.splitlines() if line.strip()), log
