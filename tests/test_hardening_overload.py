"""Overload and deadlines against a real ``deit-serve`` process: a full queue is refused at once, memory and the
latency of accepted requests stay flat under sustained overload, and a request whose deadline passes in the queue
is answered 504 without ever taking a batch slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

import httpx
import pytest

from harness.load import run_load, sample_images
from tests.serving import Scrape, ServerProcess, multipart, run_server

MODEL = "slow"


def scrape(server: ServerProcess) -> Scrape:
    return Scrape.parse(httpx.get(f"{server.url}/metrics", timeout=10).text)


def wait_for_metric(server: ServerProcess, sample: str, at_least: float, timeout: float = 10.0) -> None:
    """Poll /metrics until ``sample`` (of the test model) reaches ``at_least``; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scrape(server).value(sample, model=MODEL) >= at_least:
            return
        time.sleep(0.01)
    raise TimeoutError(f"{sample} did not reach {at_least} within {timeout}s")


@pytest.fixture(scope="module")
def one_image_batches(slow_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One image per forward pass (tens of ms each): a request of 128 images keeps the model busy for seconds."""
    env = {
        "DEIT_MAX_BATCH_SIZE": "1",
        "DEIT_TORCH_THREADS": "1",
        "DEIT_MAX_QUEUE_SIZE": "128",
        "DEIT_MAX_FILES": "128",
        "DEIT_REQUEST_TIMEOUT_S": "0.3",
        "DEIT_MAX_REQUEST_TIMEOUT_S": "1.0",
    }
    with run_server(slow_store, tmp_path_factory.mktemp("one-image-batches"), env=env) as server:
        yield server


def post(server: ServerProcess, images: list[bytes], timeout_header: str | None = None) -> httpx.Response:
    headers = {"X-Request-Timeout": timeout_header} if timeout_header is not None else {}
    return httpx.post(f"{server.url}/classify", files=multipart(images), headers=headers, timeout=60)


def test_sustained_overload_keeps_memory_flat_and_accepted_latency(slow_store: Path, tmp_path: Path) -> None:
    """4× the queue in closed-loop clients; refused clients retry after a short pause, as a polite client would."""
    queue = 8
    env = {"DEIT_MAX_QUEUE_SIZE": str(queue), "DEIT_MAX_BATCH_SIZE": "4", "DEIT_TORCH_THREADS": "1"}
    images = sample_images(8)
    with run_server(slow_store, tmp_path, env=env) as server:
        pid = server.process.pid
        at_capacity = asyncio.run(
            run_load(server.url, images, concurrency=queue, duration_s=2.5, server_pid=pid, timeout_s=60)
        )
        overload = asyncio.run(
            run_load(
                server.url, images, concurrency=4 * queue, duration_s=4.0, backoff_s=0.05, server_pid=pid,
                timeout_s=60,
            )
        )  # fmt: skip
        metrics = scrape(server)
        assert server.process.poll() is None

    assert set(at_capacity.statuses) == {200}, at_capacity.summary()
    assert set(overload.statuses) == {200, 503}, overload.summary()
    assert set(overload.error_codes) == {"overloaded"}
    assert metrics.value("deit_rejected_total", model=MODEL, reason="queue_full") == overload.statuses[503]
    offered = sum(overload.statuses.values()) / overload.elapsed_s
    accepted = overload.statuses[200] / overload.elapsed_s
    assert offered >= 3 * accepted, f"not overloaded: {overload.summary()}"
    assert overload.statuses[200] >= 10, overload.summary()

    # Accepted requests wait behind at most a full queue, so their latency stays near that at capacity; an unbounded
    # queue would hold all 32 clients' images: 4× the latency. The margin is for the refusals' CPU on a small machine.
    p50_capacity = median(at_capacity.ok_latencies_s)
    p50_overload = median(overload.ok_latencies_s)
    assert p50_overload < 3 * p50_capacity, (at_capacity.summary(), overload.summary())

    # RSS over the overload run: the last second holds no more than the first (beyond allocator noise).
    samples = overload.rss_samples
    assert len(samples) > 20
    first = median(rss for t, rss in samples if t < 1.0)
    last = median(rss for t, rss in samples if t > overload.elapsed_s - 1.0)
    assert last - first < 24 * 2**20, (first / 2**20, last / 2**20)
    assert max(rss for _, rss in samples) - first < 64 * 2**20


def test_a_full_queue_is_refused_at_once_with_retry_after(one_image_batches: ServerProcess) -> None:
    server = one_image_batches
    before = scrape(server)
    images = sample_images(128)
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(post, server, images, "1.0")
        wait_for_metric(server, "deit_queue_depth", 1)
        started = time.monotonic()
        refused = post(server, images)
        refused_after = time.monotonic() - started
        blocker.result()
    after = scrape(server)

    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "overloaded"
    assert refused.headers["Retry-After"] == "1"
    assert refused_after < 1.0, "a refusal must not wait for the queue"
    rejected = "deit_rejected_total"
    assert after.value(rejected, model=MODEL, reason="queue_full") - before.value(rejected, model=MODEL) == 1


def test_a_deadline_passing_in_the_queue_answers_504_and_its_images_never_run(
    one_image_batches: ServerProcess,
) -> None:
    """128 images are seconds of work, so only the deadline (default, per request, or capped) can end the request."""
    server = one_image_batches
    images = sample_images(128)
    before = scrape(server)
    for header, deadline in [(None, 0.3), ("0.6", 0.6), ("100", 1.0)]:
        started = time.monotonic()
        response = post(server, images, timeout_header=header)
        elapsed = time.monotonic() - started
        assert response.status_code == 504, (header, response.text)
        assert response.json()["error"]["code"] == "deadline_exceeded"
        assert deadline <= elapsed < deadline + 1.0, (header, elapsed)
    # Runs after every image above has run or been dropped: the model executes one batch at a time, in order.
    assert post(server, images[:1], timeout_header="1.0").status_code == 200
    after = scrape(server)

    def delta(sample: str, **labels: str) -> float:
        return after.value(sample, model=MODEL, **labels) - before.value(sample, model=MODEL, **labels)

    ran, dropped = delta("deit_images_total"), delta("deit_dropped_total", reason="deadline")
    assert ran + dropped == 3 * 128 + 1, "every image either ran or was dropped, never both"
    assert dropped >= 3 * 128 / 2
    assert delta("deit_batch_size_count") == ran, "dropped images took no batch slot"


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_an_invalid_request_timeout_is_refused(one_image_batches: ServerProcess, value: str) -> None:
    response = post(one_image_batches, sample_images(1), timeout_header=value)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_parameter"
