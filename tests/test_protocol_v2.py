"""Open Inference Protocol (KServe V2 / Triton REST) on a real server process, spoken by Triton's own client."""

from __future__ import annotations

import base64
import gzip
import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from transformers import DeiTForImageClassificationWithTeacher
from tritonclient.utils import InferenceServerException

from tests.profiles import SLOW_SHARED, slow_shared
from tests.serving import (
    SMALL_UPLOADS,
    ServerProcess,
    SharedServers,
    classify_probabilities,
    noise_image_bytes,
    plain_error,
    preprocessed_pixels,
    scrape,
    wait_until,
)

MAX_FILES = int(SMALL_UPLOADS["DEIT_MAX_FILES"])
NUM_LABELS = 10
SIZE = 32  # the tiny model's input size


def jpeg(seed: int, size: tuple[int, int] = (44, 38)) -> bytes:
    return noise_image_bytes(seed, size, "JPEG")


IMAGES = [jpeg(seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def server(tiny_store: Path, servers: SharedServers) -> ServerProcess:
    return servers.get(tiny_store, SMALL_UPLOADS)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def classify_probs(server: ServerProcess) -> np.ndarray:
    """All class probabilities of IMAGES as POST /classify answers them, ``[N, labels]``."""
    probs: np.ndarray = classify_probabilities(server.url, IMAGES, NUM_LABELS)
    return probs


@pytest.fixture(scope="module")
def pixels(tiny_store: Path) -> np.ndarray:
    """IMAGES preprocessed by the service's own Preprocessor, ``[N, 3, H, W]`` float32."""
    pixels: np.ndarray = preprocessed_pixels(tiny_store / "tiny", IMAGES)
    return pixels


def _bytes_input(images: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images), 1], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1), binary_data=True)
    else:  # JSON carries BYTES as strings: base64 of each image
        encoded = [base64.b64encode(d).decode() for d in images]
        tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_).reshape(-1, 1), binary_data=False)
    return tensor


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("tiny", "2")
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server["name"] == "deit-serve"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    meta = client.get_model_metadata("tiny")
    assert meta["name"] == "tiny"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "pytorch_deit"
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert inputs["image"]["datatype"] == "BYTES"
    assert inputs["image"]["shape"][0] == -1
    assert inputs["pixel_values"] == {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["probabilities"]["shape"] == outputs["logits"]["shape"] == [-1, NUM_LABELS]
    assert client.get_model_metadata("tiny", "1") == meta
    config = client.get_model_config("tiny")
    assert config["max_batch_size"] == 32
    assert {i["name"]: i["dims"] for i in config["input"]} == {"image": [1], "pixel_values": [3, SIZE, SIZE]}
    assert {o["name"]: o["dims"] for o in config["output"]} == {
        "probabilities": [10],
        "logits": [10],
        "embedding": [32],
    }


def test_binary_jpegs_with_classification(client: triton.InferenceServerClient, classify_probs: np.ndarray) -> None:
    outputs = [
        triton.InferRequestedOutput("probabilities", binary_data=True),
        triton.InferRequestedOutput("probabilities", binary_data=True, class_count=3),
    ]
    result = client.infer("tiny", [_bytes_input(IMAGES)], outputs=outputs[:1], request_id="req-7")
    probs = result.as_numpy("probabilities")
    assert probs.shape == (3, NUM_LABELS)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, classify_probs, atol=1e-5)
    assert result.get_response()["id"] == "req-7"
    top = client.infer("tiny", [_bytes_input(IMAGES)], outputs=outputs[1:]).as_numpy("probabilities")
    assert top.shape == (3, 3)
    for row, entries in enumerate(top):
        parsed = [e.decode().split(":") for e in entries]
        indices = [int(i) for _, i, _ in parsed]
        assert indices == list(np.argsort(-classify_probs[row])[:3])
        assert [label for _, _, label in parsed] == [f"class_{i}" for i in indices]
        np.testing.assert_allclose([float(s) for s, _, _ in parsed], classify_probs[row, indices], atol=1e-5)


def test_fp32_pixels_match_images_and_transformers(
    server: ServerProcess,
    client: triton.InferenceServerClient,
    pixels: np.ndarray,
    classify_probs: np.ndarray,
    tiny_store: Path,
) -> None:
    tensor = triton.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    result = client.infer("tiny", [tensor])  # no outputs named: all of them, binary
    np.testing.assert_allclose(result.as_numpy("probabilities"), classify_probs, atol=1e-5)
    assert "not writable" not in server.log()  # the pixels got their own memory, not the request's read-only bytes
    # The logits are the average of the two heads, as transformers' own model computes them.
    reference = DeiTForImageClassificationWithTeacher.from_pretrained(tiny_store / "tiny").eval()
    with torch.inference_mode():
        expected = reference(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-5)
    half = triton.InferInput("pixel_values", list(pixels.shape), "FP16")
    half.set_data_from_numpy(pixels.astype(np.float16), binary_data=True)
    outputs = [triton.InferRequestedOutput("probabilities")]
    from_half = client.infer("tiny", [half], outputs=outputs).as_numpy("probabilities")
    np.testing.assert_allclose(from_half, classify_probs, atol=1e-3)


def test_json_inputs_and_outputs(
    client: triton.InferenceServerClient, pixels: np.ndarray, classify_probs: np.ndarray
) -> None:
    outputs = [
        triton.InferRequestedOutput("probabilities", binary_data=False),
        triton.InferRequestedOutput("logits", binary_data=False, class_count=2),
    ]
    by_images = client.infer("tiny", [_bytes_input(IMAGES, binary=False)], outputs=outputs)
    assert "parameters" not in by_images.get_output("probabilities")  # data inline, in the JSON
    np.testing.assert_allclose(by_images.as_numpy("probabilities"), classify_probs, atol=1e-5)
    top_logits = by_images.as_numpy("logits")
    assert top_logits.shape == (3, 2)
    tensor = triton.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=False)
    by_pixels = client.infer("tiny", [tensor], outputs=outputs[:1])
    np.testing.assert_allclose(by_pixels.as_numpy("probabilities"), classify_probs, atol=1e-5)


def _infer_url(server: ServerProcess, model: str = "tiny") -> str:
    return f"{server.url}/v2/models/{model}/infer"


def _binary_request(header: dict[str, Any], binary: bytes) -> tuple[bytes, dict[str, str]]:
    encoded = json.dumps(header).encode()
    return encoded + binary, {"Inference-Header-Content-Length": str(len(encoded))}


def test_bare_bytes_without_content_type_and_binary_output(server: ServerProcess, classify_probs: np.ndarray) -> None:
    """A single image may come without its length prefix; no Content-Type; the whole answer binary."""
    size = {"binary_data_size": len(IMAGES[0])}
    header = {
        "id": "curl-1",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": size}],
        "parameters": {"binary_data_output": True},
    }
    body, headers = _binary_request(header, IMAGES[0])
    r = httpx.post(f"{server.url}/v2/models/tiny/versions/1/infer", content=body, headers=headers, timeout=30)
    assert "content-type" not in r.request.headers
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    length = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:length])
    assert meta["id"] == "curl-1"
    assert meta["model_name"] == "tiny"
    assert meta["model_version"] == "1"
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "logits"]
    probs = np.frombuffer(r.content[length : length + 4 * NUM_LABELS], dtype="<f4")
    np.testing.assert_allclose(probs, classify_probs[0], atol=1e-5)
    assert len(r.content) == length + 2 * 4 * NUM_LABELS


def test_timeout_is_in_microseconds(server: ServerProcess, client: triton.InferenceServerClient) -> None:
    # One microsecond passes before the images are classified: 504. As seconds it would have been plenty.
    with pytest.raises(InferenceServerException) as caught:
        client.infer("tiny", [_bytes_input(IMAGES[:1])], timeout=1)
    assert caught.value.status() == "504"
    assert "deadline" in caught.value.message()
    assert client.infer("tiny", [_bytes_input(IMAGES[:1])], timeout=30_000_000).as_numpy("logits") is not None
    assert client.infer("tiny", [_bytes_input(IMAGES[:1])], timeout=0).as_numpy("logits") is not None  # none set


def test_errors_take_the_protocol_shape(server: ServerProcess, pixels: np.ndarray) -> None:
    one = {"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 100}}
    body, headers = _binary_request({"inputs": [one]}, b"\x00" * 10)
    assert "runs past the end" in plain_error(httpx.post(_infer_url(server), content=body, headers=headers), 400)
    framed = struct.pack("<I", 500) + b"x" * 20  # an element longer than its tensor
    one["parameters"] = {"binary_data_size": len(framed)}
    body, headers = _binary_request({"inputs": [one]}, framed)
    assert "BYTES element 0" in plain_error(httpx.post(_infer_url(server), content=body, headers=headers), 400)
    body, headers = _binary_request({"inputs": []}, b"")
    headers["Inference-Header-Content-Length"] = "999"
    short = httpx.post(_infer_url(server), content=body, headers=headers)
    assert "Inference-Header-Content-Length" in plain_error(short, 400)
    assert "nope" in plain_error(httpx.post(_infer_url(server, "nope"), json={"inputs": []}), 404)
    assert "version" in plain_error(httpx.post(f"{server.url}/v2/models/tiny/versions/2/infer", json={}), 404)
    assert plain_error(httpx.get(f"{server.url}/v2/models/nope"), 404)
    assert plain_error(httpx.get(f"{server.url}/v2/nothing/here"), 404)
    many = [base64.b64encode(IMAGES[0]).decode()] * (MAX_FILES + 1)
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(many)], "data": many}]}
    assert f"at most {MAX_FILES}" in plain_error(httpx.post(_infer_url(server), json=request), 413)
    wrong = {"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.0] * (3 * 16 * 16)}
    message = plain_error(httpx.post(_infer_url(server), json={"inputs": [wrong]}), 400)
    assert f"[N, 3, {SIZE}, {SIZE}]" in message
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}
    assert "base64" in plain_error(httpx.post(_infer_url(server), json=request), 400)
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}]}
    assert "not an image" in plain_error(httpx.post(_infer_url(server), json=request), 415)  # "hello" is no image
    request["outputs"] = [{"name": "boxes"}]
    assert "boxes" in plain_error(httpx.post(_infer_url(server), json=request), 400)
    assert "JSON" in plain_error(httpx.post(_infer_url(server), content=b"\xff\x00"), 400)
    gzipped = httpx.post(_infer_url(server), content=gzip.compress(b"{}"), headers={"Content-Encoding": "gzip"})
    assert "uncompressed" in plain_error(gzipped, 415)


def test_metrics_count_protocol_requests_by_route(server: ServerProcess, client: triton.InferenceServerClient) -> None:
    infer = {"model": "tiny", "endpoint": "/v2/models/{model_name}/versions/{model_version}/infer", "protocol": "v2"}
    before = scrape(server)
    client.infer("tiny", [_bytes_input(IMAGES[:2])], model_version="1")
    after = scrape(server)
    counted = after.value("deit_requests_total", **infer, status="200") - before.value(
        "deit_requests_total", **infer, status="200"
    )
    assert counted == 1
    assert after.value("deit_requests_total", **infer) - before.value("deit_requests_total", **infer) == 1
    assert after.value("deit_images_total", model="tiny") - before.value("deit_images_total", model="tiny") == 2


def test_full_queue_is_refused_with_retry_after(slow_store: Path, servers: SharedServers) -> None:
    """Both protocols are admitted by the model's queue like /classify: while one request's images fill it, another
    is answered 503 with Retry-After at once, in the protocol's error shape."""
    server = servers.get(slow_store, slow_shared())  # float32 passes, one at a time: the queue stays full for seconds
    queue = int(SLOW_SHARED["DEIT_MAX_QUEUE_SIZE"])
    wait_until(lambda: _queued(server) == 0, timeout=60, what="an empty queue")
    images = [jpeg(seed, (96, 96)) for seed in range(queue)]
    tensor = {"name": "image", "datatype": "BYTES", "shape": [queue], "parameters": {"binary_data_size": 0}}
    framed = b"".join(struct.pack("<I", len(d)) + d for d in images)
    tensor["parameters"] = {"binary_data_size": len(framed)}
    body, headers = _binary_request({"inputs": [tensor]}, framed)
    hf_body = {"inputs": [base64.b64encode(d).decode() for d in images]}
    with ThreadPoolExecutor(3) as pool:
        url = _infer_url(server, "slow")
        filling = pool.submit(httpx.post, url, content=body, headers=headers, timeout=60)
        wait_until(lambda: _queued(server) >= 2, timeout=30, what="the first request's images queued")
        v2_refusal = pool.submit(httpx.post, url, content=body, headers=headers, timeout=10)
        hf_refusal = pool.submit(httpx.post, f"{server.url}/", json=hf_body, timeout=10)
        refused, refused_hf = v2_refusal.result(), hf_refusal.result()
        assert filling.result().status_code == 200
    for r in (refused, refused_hf):
        assert "capacity" in plain_error(r, 503)
        assert r.headers["retry-after"] == "1"


def _queued(server: ServerProcess) -> float:
    return scrape(server).value("deit_queue_depth", model="slow")
