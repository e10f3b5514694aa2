"""Hugging Face image-classification API on a real server process, spoken by huggingface_hub's InferenceClient."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

from tests.profiles import ZOO, ZOO_AUTH, ZOO_KEY, zoo_server
from tests.serving import ServerProcess, SharedServers, noise_image_bytes, plain_error

KEY = ZOO_KEY
MAX_FILES = int(ZOO["DEIT_MAX_FILES"])
NUM_LABELS = 10
AUTH = ZOO_AUTH


@pytest.fixture(scope="module")
def server(servers: SharedServers) -> ServerProcess:
    """Among its models ``tiny`` the default and ``other`` with different weights, API keys required (``ZOO``)."""
    assert ZOO["DEIT_DEFAULT_MODEL"] == "tiny"
    return zoo_server(servers)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "noise.png"
    path.write_bytes(noise_image_bytes(11))
    return path


def _classify(server: ServerProcess, data: bytes, model: str, top_k: int) -> list[tuple[str, float]]:
    r = httpx.post(
        f"{server.url}/classify",
        params={"model": model, "top_k": top_k},
        files=[("file", ("x.png", data, "image/png"))],
        headers=AUTH,
        timeout=30,
    )
    r.raise_for_status()
    return [(p["label"], p["score"]) for p in r.json()["results"][0]["predictions"]]


def _logits(server: ServerProcess, data: bytes, model: str) -> torch.Tensor:
    """The model's logits for ``data``, through the Open Inference Protocol on the same server."""
    request = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}],
        "outputs": [{"name": "logits"}],
    }
    r = httpx.post(f"{server.url}/v2/models/{model}/infer", json=request, headers=AUTH, timeout=30)
    r.raise_for_status()
    return torch.tensor(r.json()["outputs"][0]["data"])


def _pairs(elements: list[Any]) -> list[tuple[str, float]]:
    return [(e.label, e.score) for e in elements]


def _assert_same(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [label for label, _ in got] == [label for label, _ in expected]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-5)


def test_inference_client_matches_classify(server: ServerProcess, image_path: Path) -> None:
    client = InferenceClient(model=server.url, token=KEY)
    data = image_path.read_bytes()
    # top_k set: the client sends JSON with the image in base64.
    _assert_same(_pairs(client.image_classification(image_path, top_k=3)), _classify(server, data, "tiny", 3))
    # No parameters: the client sends the raw image; the pipeline's default of 5 predictions.
    _assert_same(_pairs(client.image_classification(data)), _classify(server, data, "tiny", 5))
    # top_k above the number of labels is capped, as the pipeline does.
    assert len(client.image_classification(data, top_k=50)) == NUM_LABELS


def test_named_model(server: ServerProcess, image_path: Path) -> None:
    data = image_path.read_bytes()
    other = InferenceClient(model=f"{server.url}/models/other", token=KEY).image_classification(data, top_k=4)
    expected = _classify(server, data, "other", 4)
    _assert_same(_pairs(other), expected)
    assert expected != _classify(server, data, "tiny", 4)  # a different model answered


@pytest.mark.parametrize(("function", "transform"), [("sigmoid", torch.sigmoid), ("none", lambda t: t)])
def test_function_to_apply(server: ServerProcess, image_path: Path, function: Any, transform: Any) -> None:
    data = image_path.read_bytes()
    client = InferenceClient(model=server.url, token=KEY)
    got = _pairs(client.image_classification(data, top_k=NUM_LABELS, function_to_apply=function))
    scores, indices = transform(_logits(server, data, "tiny")).topk(NUM_LABELS)
    _assert_same(got, [(f"class_{i}", s) for s, i in zip(scores.tolist(), indices.tolist(), strict=True)])


def test_raw_body_without_content_type_and_batched_json(server: ServerProcess) -> None:
    images = [noise_image_bytes(seed) for seed in (1, 2)]
    r = httpx.post(f"{server.url}/models/tiny", content=images[0], headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    _assert_same([(p["label"], p["score"]) for p in r.json()], _classify(server, images[0], "tiny", 5))
    body = {"inputs": [base64.b64encode(d).decode() for d in images], "parameters": {"top_k": 2}}
    r = httpx.post(f"{server.url}/", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    for answer, data in zip(r.json(), images, strict=True):
        _assert_same([(p["label"], p["score"]) for p in answer], _classify(server, data, "tiny", 2))


def test_wrong_token_is_refused(server: ServerProcess, image_path: Path) -> None:
    with pytest.raises(HfHubHTTPError) as caught:
        InferenceClient(model=server.url, token="wrong").image_classification(image_path)
    assert caught.value.response is not None
    assert caught.value.response.status_code == 401
    assert caught.value.response.json() == {"error": "the API key is not valid"}


def test_errors(server: ServerProcess) -> None:
    url = f"{server.url}/"
    assert "base64" in plain_error(httpx.post(url, json={"inputs": "%%%"}, headers=AUTH), 400)
    assert "URL" in plain_error(httpx.post(url, json={"inputs": "https://example.com/x.jpg"}, headers=AUTH), 400)
    assert "nope" in plain_error(httpx.post(f"{server.url}/models/nope", content=b"x", headers=AUTH), 404)
    image = base64.b64encode(noise_image_bytes(3)).decode()
    bad_function = {"inputs": image, "parameters": {"function_to_apply": "tanh"}}
    assert "function_to_apply" in plain_error(httpx.post(url, json=bad_function, headers=AUTH), 422)
    assert "top_k" in plain_error(
        httpx.post(url, json={"inputs": image, "parameters": {"top_k": 0}}, headers=AUTH), 422
    )
    too_many = {"inputs": [image] * (MAX_FILES + 1)}
    assert f"at most {MAX_FILES}" in plain_error(httpx.post(url, json=too_many, headers=AUTH), 413)
    assert "empty" in plain_error(httpx.post(url, content=b"", headers=AUTH), 422)
    assert plain_error(httpx.post(url, content=b"not an image", headers=AUTH), 415)


def test_open_inference_protocol_needs_the_key_too(server: ServerProcess) -> None:
    """On a server with API keys, V2 health stays open (probes) while metadata and inference need a key."""
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    assert "API key" in plain_error(httpx.get(f"{server.url}/v2/models/tiny"), 401)
    assert "API key" in plain_error(httpx.post(f"{server.url}/v2/models/tiny/infer", json={}), 401)
    assert httpx.get(f"{server.url}/v2/models/tiny", headers=AUTH).status_code == 200
