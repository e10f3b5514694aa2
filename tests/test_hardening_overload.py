"""Overload and deadlines against a real ``deit-serve`` process: a full queue is refused at once, memory and the
latency of accepted requests stay flat under sustained overload, a request whose deadline passes in the queue
is answered 504 without ever taking a batch slot, and a model load past its timeout fails while the process serves
on (and exits at SIGTERM however long the load would have taken)."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

import httpx
import pytest

from harness.load import run_load, sample_images
from tests.profiles import OVERLOAD, SLOW_SHARED, slow_shared
from tests.serving import (
    ServerProcess,
    SharedServers,
    image_bytes,
    multipart,
    plain_error,
    run_server,
    scrape,
    wait_until,
    write_tiny_model,
)

MODEL = "slow"


def wait_for_metric(server: ServerProcess, sample: str, at_least: float, timeout: float = 10.0) -> None:
    """Poll /metrics until ``sample`` (of the test model) reaches ``at_least``; bounded by ``timeout``."""
    wait_until(lambda: scrape(server).value(sample, model=MODEL) >= at_least, timeout, f"{sample} >= {at_least}")


@pytest.fixture(scope="module")
def deadlines_store(slow_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The slow model in a store of this module's own: the load-timeout test adds a model to it."""
    store = tmp_path_factory.mktemp("deadlines-store")
    shutil.copytree(slow_store / MODEL, store / MODEL)
    return store


@pytest.fixture(scope="module")
def one_image_batches(deadlines_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One image per forward pass (tens of ms each): a request of 128 images keeps the model busy for seconds; short
    deadlines (a request's by default, the cap on the one it asks for, a load's) that only the tests here want. The
    load-timeout test, last in this module, stops it."""
    env = {
        "DEIT_MAX_BATCH_SIZE": "1",
        "DEIT_TORCH_THREADS": "1",
        "DEIT_MAX_QUEUE_SIZE": "128",
        "DEIT_MAX_FILES": "128",
        "DEIT_REQUEST_TIMEOUT_S": "0.3",
        "DEIT_MAX_REQUEST_TIMEOUT_S": "1.0",
        "DEIT_LOAD_TIMEOUT_S": "2",
        "DEIT_DRAIN_TIMEOUT_S": "1",
    }
    with run_server(deadlines_store, tmp_path_factory.mktemp("one-image-batches"), env=env) as server:
        yield server


def post(server: ServerProcess, images: list[bytes], timeout_header: str | None = None) -> httpx.Response:
    headers = {"X-Request-Timeout": timeout_header} if timeout_header is not None else {}
    return httpx.post(f"{server.url}/classify", files=multipart(images), headers=headers, timeout=60)


@pytest.fixture
def busy(slow_store: Path, servers: SharedServers) -> Iterator[ServerProcess]:
    """The shared slow model (``slow_shared``): room for 128 images a request and in the queue. Left with an empty
    queue for the next test on it."""
    server = servers.get(slow_store, slow_shared())
    yield server
    wait_until(lambda: scrape(server).value("deit_queue_depth", model=MODEL) == 0, what="an empty queue")


def test_sustained_overload_keeps_memory_flat_and_accepted_latency(slow_store: Path, servers: SharedServers) -> None:
    """4× the queue in closed-loop clients; refused clients retry after a short pause, as a polite client would."""
    queue = int(OVERLOAD["DEIT_MAX_QUEUE_SIZE"])  # 8, in batches of 4
    images = sample_images(8)
    server = servers.get(slow_store, OVERLOAD)
    rejected_before = scrape(server).value("deit_rejected_total", model=MODEL, reason="queue_full")
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
    rejected = metrics.value("deit_rejected_total", model=MODEL, reason="queue_full") - rejected_before
    assert rejected == overload.statuses[503]
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


def test_a_full_queue_is_refused_at_once_with_retry_after(busy: ServerProcess) -> None:
    server = busy
    before = scrape(server)
    images = sample_images(int(SLOW_SHARED["DEIT_MAX_QUEUE_SIZE"]))
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(post, server, images, "5")  # seconds of work: ended by its deadline, at most
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
    full = {"model": MODEL, "reason": "queue_full"}
    assert after.value("deit_rejected_total", **full) - before.value("deit_rejected_total", **full) == 1


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
def test_an_invalid_request_timeout_is_refused(busy: ServerProcess, value: str) -> None:
    response = post(busy, sample_images(1), timeout_header=value)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_parameter"


# --- a load's deadline (last: it stops the module's server) ---------------------------------------------------


def write_endless_model(directory: Path) -> Path:
    """A tiny model whose preprocessing crops 2048×2048: valid, but its warm-up takes hours on a CPU."""
    write_tiny_model(directory)
    preprocess = {"size": 2048, "crop_size": 2048, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocess))
    return directory


def test_a_load_past_its_timeout_fails_and_sigterm_exits_during_a_load(
    one_image_batches: ServerProcess, deadlines_store: Path
) -> None:
    server = one_image_batches
    store = deadlines_store
    files = [("file", ("a.png", image_bytes(), "image/png"))]
    write_endless_model(store / "endless")
    load = f"{server.url}/v2/repository/models/endless/load"
    timed_out = httpx.post(load, timeout=60)
    assert "did not finish within 2 s" in plain_error(timed_out, 400)
    index = httpx.post(f"{server.url}/v2/repository/index").json()
    assert {"name": "endless", "version": "1", "state": "UNAVAILABLE"} in [
        {k: row[k] for k in ("name", "version", "state")} for row in index
    ]
    assert httpx.post(f"{server.url}/classify", files=files, headers={"X-Request-Timeout": "1"}).status_code == 200

    assert httpx.post(f"{server.url}/v2/repository/models/{MODEL}/unload").status_code == 200
    nothing = httpx.post(f"{server.url}/classify", files=files)
    assert nothing.status_code == 404
    assert nothing.json()["error"]["message"].startswith("no model is loaded")
    assert httpx.get(f"{server.url}/readyz").status_code == 200

    answers: list[httpx.Response] = []
    pending = threading.Thread(target=lambda: answers.append(httpx.post(load, timeout=60)))
    pending.start()

    def loading() -> bool:
        rows = httpx.post(f"{server.url}/v2/repository/index").json()
        return any(r["name"] == "endless" and r["state"] == "LOADING" for r in rows)

    wait_until(loading, what="the second load under way", every=0.25)
    server.terminate()
    assert server.wait(timeout=30) == 0  # drain 1 s, then the answers' grace: never the hours of the warm-up
    pending.join(timeout=30)
    assert len(answers) == 1
    answer = answers[0]
    assert answer.status_code in (400, 503), answer.text  # the load's own timeout or the abandoned drain: JSON
    assert set(answer.json()) == {"error"}
    text = server.log()
    assert "Exception in ASGI application" not in text
    assert "Traceback" not in text
