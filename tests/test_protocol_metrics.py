"""Every front door (POST /classify, Open Inference Protocol, Hugging Face API) in the same ``deit_*`` series, on a
real server process: counted under its own ``protocol`` label, its images batched with the others' images."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from huggingface_hub import InferenceClient
from PIL import Image

from tests.profiles import SLOW_SHARED, slow_shared
from tests.serving import Scrape, ServerProcess, SharedServers, scrape, wait_until

MAX_BATCH = int(SLOW_SHARED["DEIT_MAX_BATCH_SIZE"])  # 16
BLOCKER_IMAGES = 2 * MAX_BATCH  # two full forward passes of the slow model: the time the three others take to queue
V2_INFER = "/v2/models/{model_name}/infer"


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (72, 90, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def server(slow_store: Path, servers: SharedServers) -> Iterator[ServerProcess]:
    """The shared slow model (``slow_shared``): float32 on one forward worker, passes of up to 16 images. Each test
    starts and ends with its queue empty."""
    shared = servers.get(slow_store, slow_shared())
    wait_until(lambda: scrape(shared).value("deit_queue_depth", model="slow") == 0, 60, "an empty queue")
    yield shared
    wait_until(lambda: scrape(shared).value("deit_queue_depth", model="slow") == 0, 60, "an empty queue")


def classify(server: ServerProcess, images: list[bytes]) -> None:
    files = [("file", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    r = httpx.post(f"{server.url}/classify", params={"model": "slow"}, files=files, timeout=120)
    assert r.status_code == 200, r.text


def v2_infer(server: ServerProcess, image: bytes) -> None:
    """A binary-tensor-data infer request, encoded by Triton's own client."""
    tensor = triton.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
    headers = {"Inference-Header-Content-Length": str(header_length), "Content-Type": "application/octet-stream"}
    r = httpx.post(f"{server.url}/v2/models/slow/infer", content=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text


def hf_classify(server: ServerProcess, image: bytes) -> None:
    result = InferenceClient(model=f"{server.url}/models/slow", timeout=120).image_classification(image)
    assert len(result) == 5


def test_each_front_door_is_counted_under_its_protocol(server: ServerProcess) -> None:
    before = scrape(server)
    classify(server, [jpeg(1)])
    v2_infer(server, jpeg(2))
    hf_classify(server, jpeg(3))
    assert httpx.post(f"{server.url}/models/nope", content=jpeg(4), timeout=30).status_code == 404
    assert httpx.get(f"{server.url}/v2/no-such-route", timeout=30).status_code == 404
    after = scrape(server)

    def counted(**labels: str) -> float:
        return after.value("deit_requests_total", **labels) - before.value("deit_requests_total", **labels)

    def timed(**labels: str) -> float:
        name = "deit_request_duration_seconds_count"
        return after.value(name, **labels) - before.value(name, **labels)

    doors = {"native": "/classify", "v2": V2_INFER, "hf": "/models/{model_name}"}
    for protocol, endpoint in doors.items():
        assert counted(model="slow", endpoint=endpoint, protocol=protocol, status="200") == 1, protocol
        assert timed(model="slow", endpoint=endpoint, protocol=protocol) == 1, protocol
        for other in set(doors) - {protocol}:  # the label follows the route, never another door's
            assert counted(endpoint=endpoint, protocol=other) == 0, (protocol, other)
    # Refusals are counted under their door too, even without a model or a matching route.
    assert counted(endpoint="/models/{model_name}", protocol="hf", status="404") == 1
    assert counted(endpoint="unmatched", protocol="v2", status="404") == 1
    assert counted(protocol="v2") == 2
    assert counted(protocol="hf") == 2
    # /metrics itself is a native route
    assert after.value("deit_requests_total", endpoint="/metrics", protocol="native", status="200") >= 1


def _concurrently(calls: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def run(call: Callable[[], None]) -> None:
        try:
            call()
        except BaseException as e:  # re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a request did not finish within 180 s"
    if errors:
        raise errors[0]


def _access_records(server: ServerProcess, since: int) -> list[dict[str, object]]:
    return [r for r in server.log_records()[since:] if r.get("message") == "request" and r.get("images")]


def _shared_round(server: ServerProcess, blocker: list[bytes]) -> tuple[Scrape, Scrape, list[dict[str, object]]]:
    """The blocker, and one image through each door while it runs: scrapes around it, the three's log lines."""
    before = scrape(server)
    logged = len(server.log_records())
    thread = threading.Thread(target=classify, args=(server, blocker))
    thread.start()
    wait_until(lambda: scrape(server).value("deit_queue_depth", model="slow") >= MAX_BATCH, 60, "blocker queued")
    _concurrently([lambda: classify(server, [jpeg(10)]), lambda: v2_infer(server, jpeg(11)),
                   lambda: hf_classify(server, jpeg(12))])  # fmt: skip
    thread.join(timeout=180)
    wait_until(lambda: len(_access_records(server, logged)) >= 4, 10, "access log lines")
    small = [r for r in _access_records(server, logged) if r["images"] == 1]
    return before, scrape(server), small


def test_three_front_doors_share_one_forward_pass(server: ServerProcess) -> None:
    """While a large /classify request keeps the one forward slot busy, one image each through /classify, V2 infer
    and the Hugging Face route queue up: the next forward pass holds all three (one pass of size 3 in
    ``deit_batch_size``, each request's log line saying batch size 3, three queue waits in ``deit_queue_wait``)."""
    blocker = [jpeg(100 + i) for i in range(BLOCKER_IMAGES)]
    for _ in range(3):  # the three must queue while the blocker runs: retried on a machine too loaded for that
        before, after, small = _shared_round(server, blocker)
        if all(r["batch_size"] == [3] for r in small):
            break
    else:
        pytest.fail(f"the three requests never shared a forward pass: {small}")

    assert sorted(str(r["protocol"]) for r in small) == ["hf", "native", "v2"]

    def delta(name: str, **labels: str) -> float:
        return after.value(name, model="slow", **labels) - before.value(name, model="slow", **labels)

    images = BLOCKER_IMAGES + 3
    assert delta("deit_batch_size_sum") == images
    assert delta("deit_batch_size_count") == 3  # two blocker passes and the shared one
    assert delta("deit_batch_size_bucket", le="2.0") == 0  # no pass of one or two images: none ran alone
    assert delta("deit_batch_size_bucket", le="4.0") == 1
    assert delta("deit_queue_wait_seconds_count") == images
    assert delta("deit_images_total") == images
