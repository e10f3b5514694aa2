"""Clients that leave and forward passes that fail: the work of a client that has gone is dropped before it runs,
a failed batch fails only its own requests, an out-of-memory batch is retried as smaller ones, and the server keeps
serving throughout."""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import Tensor

from harness.load import sample_images
from service.engine.batching import Batcher
from service.engine.runner import Forward, Outputs
from service.settings import Settings
from tests.profiles import slow_shared
from tests.serving import (
    InProcessServer,
    ServerProcess,
    SharedServers,
    free_port,
    image_bytes,
    multipart,
    multipart_body,
    scrape,
    serve_in_process,
    wait_until,
)

SLOW = "slow"


def post(url: str, images: list[bytes], **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/classify", files=multipart(images), headers=headers, timeout=60)


# --- disconnects (a real server process) ----------------------------------------------------------------------


@pytest.fixture
def slow_server(slow_store: Path, servers: SharedServers) -> Iterator[ServerProcess]:
    """The shared slow model (``slow_shared``), left with an empty queue for the next test on it."""
    server = servers.get(slow_store, slow_shared())
    yield server
    wait_until(lambda: scrape(server.url).value("deit_queue_depth", model=SLOW) == 0, what="an empty queue")


def raw_request(url: str, body: bytes, content_type: str, request_id: str, declared_length: int | None = None) -> bytes:
    host = url.removeprefix("http://")
    head = (
        f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {declared_length if declared_length is not None else len(body)}\r\n"
        f"X-Request-ID: {request_id}\r\n\r\n"
    )
    return head.encode() + body


def access_record(server: ServerProcess, request_id: str) -> dict[str, Any]:
    def found() -> bool:
        return any(r.get("request_id") == request_id for r in server.log_records())

    wait_until(found, what=f"the access log line of {request_id}")
    [record] = [r for r in server.log_records() if r.get("request_id") == request_id]
    return record


def test_images_of_a_client_that_left_are_dropped_before_they_run(slow_server: ServerProcess) -> None:
    server = slow_server
    before = scrape(server.url)
    preprocessed = before.value("deit_preprocess_duration_seconds_count", model=SLOW)
    dropped = before.value("deit_dropped_total", model=SLOW, reason="disconnect")
    blocker_images = 64  # four forward passes of 16: seconds in which the leaving client's images wait behind them
    body, content_type = multipart_body(sample_images(3))
    request_id = f"gone-{uuid.uuid4().hex[:8]}"
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(post, server.url, sample_images(blocker_images))
        wait_until(lambda: scrape(server.url).value("deit_queue_depth", model=SLOW) >= 1, what="blocker queued")
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as client:
            client.sendall(raw_request(server.url, body, content_type, request_id))
            wait_until(
                lambda: (
                    scrape(server.url).value("deit_preprocess_duration_seconds_count", model=SLOW)
                    >= preprocessed + blocker_images + 3
                ),
                what="the leaving client's images decoded",
            )
        wait_until(
            lambda: scrape(server.url).value("deit_dropped_total", model=SLOW, reason="disconnect") >= dropped + 3,
            what="the disconnect noticed",
        )
        assert not blocker.done(), "the blocker finished first: the images were not dropped from a queue"
        assert blocker.result().status_code == 200
    after = scrape(server.url)

    assert after.value("deit_dropped_total", model=SLOW, reason="disconnect") - dropped == 3
    ran = after.value("deit_images_total", model=SLOW) - before.value("deit_images_total", model=SLOW)
    assert ran == blocker_images, "the leaving client's images must never reach the model"
    record = access_record(server, request_id)
    assert record["status"] == 499
    assert record["error"] == "client_closed_request"
    assert post(server.url, sample_images(1)).status_code == 200


def test_a_client_leaving_mid_upload_is_logged_and_the_server_keeps_serving(slow_server: ServerProcess) -> None:
    server = slow_server
    body, content_type = multipart_body(sample_images(2))
    request_id = f"half-{uuid.uuid4().hex[:8]}"
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as client:
        request = raw_request(server.url, body, content_type, request_id, declared_length=len(body) + 10_000)
        client.sendall(request)
        wait_until(
            lambda: scrape(server.url).value("deit_upload_bytes_in_flight") > 0, what="the server reading the body"
        )
    record = access_record(server, request_id)
    assert record["status"] == 499
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert post(server.url, sample_images(1)).status_code == 200


# --- failing forward passes (in process: the model runner is replaced at its seam) ---------------------------------


class FaultyRunner:
    """The real runner behind a gate, raising out-of-memory above ``oom_above`` images or on an all-black input."""

    def __init__(self, real: Forward, oom_above: int) -> None:
        self.real = real
        self.oom_above = oom_above
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, pixels: Sequence[Tensor]) -> Outputs:
        self.sizes.append(len(pixels))
        self.entered.set()
        if not self.gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        if any(bool((p == -1.0).all()) for p in pixels):  # black, after the tiny model's 0.5 mean/std
            raise RuntimeError("poisoned input")
        if len(pixels) > self.oom_above:
            raise torch.OutOfMemoryError(f"out of memory on {len(pixels)} images")
        return self.real(pixels)


@pytest.fixture
def in_process(tiny_store: Path) -> Iterator[InProcessServer]:
    settings = Settings.model_validate(
        {"model_store": tiny_store, "port": free_port(), "grpc_port": 0, "max_batch_size": 4, "max_batch_delay_ms": 0}
    )
    with serve_in_process(settings) as server:
        yield server


def batcher_of(server: InProcessServer) -> Batcher:
    batcher: Batcher = server.app.state.deit.store.get(None).batcher
    return batcher


def install(server: InProcessServer, oom_above: int) -> FaultyRunner:
    batcher = batcher_of(server)
    runner = FaultyRunner(batcher.runner.forward, oom_above)
    batcher.runner.forward = runner
    return runner


def queue_behind_a_held_batch(
    server: InProcessServer, runner: FaultyRunner, pool: ThreadPoolExecutor, requests: list[list[bytes]]
) -> tuple[Any, list[Any]]:
    """A one-image request holds the model at the gate while ``requests`` queue up behind it as one batch."""
    holder = pool.submit(post, server.url, [image_bytes(color=(9, 9, 9))])
    wait_until(runner.entered.is_set, what="the holding batch started")
    queued = [pool.submit(post, server.url, images) for images in requests]
    total = sum(len(images) for images in requests)
    wait_until(lambda: batcher_of(server).queued == total, what="the requests queued")
    runner.gate.set()
    return holder, queued


def top1(response: httpx.Response) -> list[tuple[str, float]]:
    return [(r["predictions"][0]["label"], r["predictions"][0]["score"]) for r in response.json()["results"]]


def test_a_failed_batch_fails_only_its_requests(in_process: InProcessServer, caplog: pytest.LogCaptureFixture) -> None:
    runner = install(in_process, oom_above=64)
    poisoned = [image_bytes(color=(0, 0, 0))]
    healthy = [image_bytes(color=(30, 200, 40))]
    with caplog.at_level(logging.ERROR, logger="deit_serve.batching"), ThreadPoolExecutor(4) as pool:
        holder, (bad, good) = queue_behind_a_held_batch(in_process, runner, pool, [poisoned, healthy])
        results = [holder.result(), bad.result(), good.result()]
    after = post(in_process.url, healthy)

    assert [r.status_code for r in results] == [200, 500, 500]
    assert {r.json()["error"]["code"] for r in results[1:]} == {"inference_failed"}
    assert after.status_code == 200
    assert runner.sizes == [1, 2, 1]
    [failure] = [r for r in caplog.records if r.getMessage() == "forward pass failed"]
    assert failure.__dict__["batch_size"] == 2
    assert failure.exc_info is not None
    assert "poisoned input" in str(failure.exc_info[1])
    assert scrape(in_process.url).value("deit_batch_failures_total") == 1


def test_an_out_of_memory_batch_is_retried_as_halves(
    in_process: InProcessServer, caplog: pytest.LogCaptureFixture
) -> None:
    images = [image_bytes(color=(40 * i, 255 - 40 * i, 90)) for i in range(4)]
    expected = [top1(post(in_process.url, [image]))[0] for image in images]
    runner = install(in_process, oom_above=2)
    with caplog.at_level(logging.WARNING, logger="deit_serve.batching"), ThreadPoolExecutor(5) as pool:
        holder, queued = queue_behind_a_held_batch(in_process, runner, pool, [[image] for image in images])
        responses = [f.result() for f in queued]

    assert holder.result().status_code == 200
    assert [r.status_code for r in responses] == [200] * 4
    for response, (label, score) in zip(responses, expected, strict=True):
        [(got_label, got_score)] = top1(response)
        assert got_label == label
        assert got_score == pytest.approx(score, abs=1e-5)
    assert runner.sizes == [1, 4, 2, 2]
    assert any("out of memory on a batch of 4" in r.getMessage() for r in caplog.records)


def test_out_of_memory_again_on_the_retry_fails_that_batch_only(in_process: InProcessServer) -> None:
    runner = install(in_process, oom_above=1)
    images = [image_bytes(color=(10, 20 * i, 200)) for i in range(4)]
    with ThreadPoolExecutor(5) as pool:
        holder, queued = queue_behind_a_held_batch(in_process, runner, pool, [[image] for image in images])
        responses = [f.result() for f in queued]

    assert holder.result().status_code == 200
    assert [r.status_code for r in responses] == [500] * 4
    assert {r.json()["error"]["code"] for r in responses} == {"inference_failed"}
    assert runner.sizes == [1, 4, 2]
    assert post(in_process.url, images[:1]).status_code == 200
