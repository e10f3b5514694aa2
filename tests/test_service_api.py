"""The HTTP API in process: the real app factory and lifespan over a tiny checkpoint, through Starlette's client."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.engine.repository import Repository
from service.metrics import Metrics
from service.model.architecture import Architecture
from service.model.checkpoints import load_checkpoint
from service.model.preprocessing import Preprocessor
from service.settings import Settings
from tests.serving import Scrape, noise_image_bytes, write_tiny_model

MAX_BATCH = 4
UPLOAD_LIMIT = 256 * 1024
NUM_LABELS = 10

Json = dict[str, Any]


def _settings(store: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_store": store,
        "device": "cpu",
        "dtype": "float32",
        "max_batch_size": MAX_BATCH,
        "max_upload_bytes": UPLOAD_LIMIT,
        "access_log": False,
        "grpc_port": 0,
    }
    return Settings(**(values | overrides))


async def _loaded(app: FastAPI) -> None:
    await asyncio.wait_for(asyncio.shield(app.state.loading), timeout=60)


@pytest.fixture(scope="module")
def app(tiny_store: Path) -> FastAPI:
    return create_app(_settings(tiny_store))


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    """One app for the module, its models loaded: entering the client runs the lifespan; then await the load."""
    with TestClient(app) as client:
        assert client.portal is not None
        client.portal.call(_loaded, app)
        yield client


@pytest.fixture(scope="module")
def reference(tiny_store: Path) -> Callable[[bytes], torch.Tensor]:
    """Class probabilities computed without the service: checkpoint loader, preprocessor, both heads by hand."""
    checkpoint = load_checkpoint(tiny_store / "tiny", device="cpu", dtype="float32")
    preprocess = Preprocessor(checkpoint.preprocess)

    def probabilities(data: bytes) -> torch.Tensor:
        pixels = preprocess(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
        with torch.inference_mode():
            cls_logits, dist_logits = checkpoint.model.head_logits(pixels)
        return torch.softmax((cls_logits + dist_logits) / 2, dim=-1)[0]

    return probabilities


def _png_part(name: str, data: bytes, content_type: str = "image/png") -> tuple[str, tuple[str, bytes, str]]:
    return ("file", (name, data, content_type))


def _classify(client: TestClient, *images: tuple[str, bytes], **params: Any) -> Json:
    response = client.post("/classify", params=params, files=[_png_part(n, d) for n, d in images])
    assert response.status_code == 200, response.text
    body: Json = response.json()
    return body


class _Response(Protocol):
    """What the checks read of a response, from httpx or from the test client's own HTTP library."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    def json(self, **kwargs: Any) -> Any: ...


def _assert_error(response: _Response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    for fragment in fragments:
        assert fragment in body["error"]["message"], body


# --- classification -------------------------------------------------------------------------------------------


def test_scores_are_the_softmax_of_the_averaged_heads(
    client: TestClient, reference: Callable[[bytes], torch.Tensor]
) -> None:
    data = noise_image_bytes(1)
    body = _classify(client, ("noise.png", data), top_k=NUM_LABELS)
    assert set(body) == {"model", "results"}
    assert body["model"] == "tiny"
    [result] = body["results"]
    assert set(result) == {"filename", "predictions"}
    assert result["filename"] == "noise.png"
    predictions = result["predictions"]
    assert all(set(p) == {"label", "index", "score"} for p in predictions)
    assert sorted(p["index"] for p in predictions) == list(range(NUM_LABELS))
    assert all(p["label"] == f"class_{p['index']}" for p in predictions)
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)
    expected = reference(data)
    assert predictions[0]["index"] == int(expected.argmax())
    for p in predictions:
        assert p["score"] == pytest.approx(float(expected[p["index"]]), abs=1e-5)


def test_top_k_defaults_to_five_and_is_a_prefix_of_the_ranking(client: TestClient) -> None:
    data = noise_image_bytes(2)
    full = _classify(client, ("a.png", data), top_k=NUM_LABELS)["results"][0]["predictions"]
    default = _classify(client, ("a.png", data))["results"][0]["predictions"]
    three = _classify(client, ("a.png", data), top_k=3)["results"][0]["predictions"]
    assert [p["index"] for p in default] == [p["index"] for p in full[:5]]
    assert [p["index"] for p in three] == [p["index"] for p in full[:3]]
    assert [p["score"] for p in three] == pytest.approx([p["score"] for p in full[:3]], abs=1e-6)


@pytest.mark.parametrize("top_k", [0, -1, NUM_LABELS + 1])
def test_out_of_range_top_k_is_refused_naming_it(client: TestClient, top_k: int) -> None:
    response = client.post("/classify", params={"top_k": top_k}, files=[_png_part("a.png", noise_image_bytes(3))])
    _assert_error(response, 422, "invalid_parameter", "top_k")


def test_several_files_keep_their_order_and_names(client: TestClient) -> None:
    images = [(f"img-{seed}.png", noise_image_bytes(seed)) for seed in range(10, 16)]
    body = _classify(client, *images, top_k=NUM_LABELS)
    assert [r["filename"] for r in body["results"]] == [name for name, _ in images]
    for (name, data), result in zip(images, body["results"], strict=True):
        alone = _classify(client, (name, data), top_k=NUM_LABELS)["results"][0]["predictions"]
        assert [p["index"] for p in result["predictions"]] == [p["index"] for p in alone]
        assert [p["score"] for p in result["predictions"]] == pytest.approx([p["score"] for p in alone], abs=1e-5)


def test_raw_image_body(client: TestClient) -> None:
    data = noise_image_bytes(4)
    multipart = _classify(client, ("x.png", data))["results"][0]["predictions"]
    response = client.post("/classify", content=data, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    assert result["filename"] == "image"
    assert [p["index"] for p in result["predictions"]] == [p["index"] for p in multipart]
    assert [p["score"] for p in result["predictions"]] == pytest.approx([p["score"] for p in multipart], abs=1e-5)
    named = client.post("/classify", content=data, headers={"Content-Type": "image/png", "X-Filename": "cam-1.png"})
    assert named.json()["results"][0]["filename"] == "cam-1.png"


# --- errors ---------------------------------------------------------------------------------------------------


def _corrupt(png: bytes) -> bytes:
    data = bytearray(png)
    start = png.index(b"IDAT") + 8
    for i in range(start, start + 32):
        data[i] ^= 0xFF
    return bytes(data)


def _chunks(data: bytes, size: int = 16 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


_PNG = noise_image_bytes(5)
_LARGE = noise_image_bytes(6, size=(400, 400))
assert len(_LARGE) > UPLOAD_LIMIT

ERROR_CASES: list[tuple[str, dict[str, Any], int, str, tuple[str, ...]]] = [
    ("not an image", {"files": [_png_part("notes.txt", b"plain text, no pixels", "text/plain")]},
     415, "unsupported_media_type", ("notes.txt", "not an image")),
    ("truncated png", {"files": [_png_part("cut.png", _PNG[: len(_PNG) // 2])]},
     422, "invalid_image", ("cut.png", "truncated")),
    ("corrupt png", {"files": [_png_part("flipped.png", _corrupt(_PNG))]},
     422, "invalid_image", ("flipped.png", "corrupt")),
    ("zero-byte file", {"files": [_png_part("empty.png", b"")]}, 422, "empty_upload", ("empty.png", "empty")),
    ("one bad file among good ones", {"files": [_png_part("ok.png", _PNG), _png_part("empty.png", b"")]},
     422, "empty_upload", ("empty.png",)),
    ("no file field", {"files": [("picture", ("a.png", _PNG, "image/png"))]}, 422, "empty_upload", ("'file'",)),
    ("unknown model", {"params": {"model": "nope"}, "files": [_png_part("a.png", _PNG)]},
     404, "model_not_found", ("'nope'", "tiny")),
    ("too large, declared", {"files": [_png_part("big.png", _LARGE)]},
     413, "payload_too_large", (str(UPLOAD_LIMIT),)),
    ("too large, streamed", {"content": _chunks(_LARGE), "headers": {"Content-Type": "image/png"}},
     413, "payload_too_large", (str(UPLOAD_LIMIT),)),
    ("text/plain body", {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
     415, "unsupported_media_type", ("text/plain",)),
    ("no Content-Type", {"content": _PNG}, 415, "unsupported_media_type", ("missing",)),
    ("multipart without boundary", {"content": b"--x--", "headers": {"Content-Type": "multipart/form-data"}},
     400, "bad_request", ("boundary",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code", "fragments"),
    [pytest.param(*case[1:], id=case[0]) for case in ERROR_CASES],
)
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(
    client: TestClient, request_kwargs: dict[str, Any], status: int, code: str, fragments: tuple[str, ...]
) -> None:
    _assert_error(client.post("/classify", **request_kwargs), status, code, *fragments)
    assert _classify(client, ("after.png", _PNG))["results"][0]["filename"] == "after.png"


# --- models, metrics, docs ------------------------------------------------------------------------------------


def test_model_endpoints(client: TestClient) -> None:
    expected = {
        "name": "tiny",
        "architecture": Architecture.DISTILLED.value,
        "num_labels": NUM_LABELS,
        "image_size": 32,
        "input_size": [32, 32],
        "dtype": "float32",
        "device": "cpu",
        "ready": True,
        "default": True,
    }
    listing = client.get("/v1/models")
    assert listing.status_code == 200
    [model] = listing.json()["models"]
    assert model.items() >= expected.items()
    assert model["parameters"] > 0
    assert model["runtime"] == {"name": "torch", "precision": "float32", "reason": "--runtime torch"}  # the default
    one = client.get("/v1/models/tiny")
    assert one.status_code == 200
    assert one.json() == model
    _assert_error(client.get("/v1/models/nope"), 404, "model_not_found", "'nope'")


def test_metrics_cover_every_declared_metric_with_sensible_values(client: TestClient) -> None:
    _classify(client, ("m1.png", noise_image_bytes(20)), ("m2.png", noise_image_bytes(21)))
    client.post("/classify", files=[_png_part("empty.png", b"")])
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    scrape = Scrape.parse(response.text)

    declared = {family.name for family in Metrics(MAX_BATCH).registry.collect()}
    assert declared <= set(scrape.families), declared - set(scrape.families)

    tiny = {"model": "tiny"}
    assert scrape.value("deit_requests_total", endpoint="/classify", status="200", **tiny) >= 1
    assert scrape.value("deit_requests_total", endpoint="/classify", status="422", **tiny) >= 1
    assert scrape.value("deit_request_duration_seconds_count", endpoint="/classify", **tiny) >= 2
    images = scrape.value("deit_images_total", **tiny)
    assert images >= 2
    assert scrape.value("deit_batch_size_sum", **tiny) == images
    assert 1 <= scrape.value("deit_batch_size_count", **tiny) <= images
    assert scrape.value("deit_queue_wait_seconds_count", **tiny) == images
    assert scrape.value("deit_forward_duration_seconds_count", **tiny) == scrape.value("deit_batch_size_count", **tiny)
    # How long a pass takes is the CPU's business (a sum may read 0 on a fast one); that it is timed in its forward
    # thread is checked in tests/test_forward_workers.py.
    assert scrape.value("deit_preprocess_duration_seconds_count", **tiny) >= images
    assert scrape.has_sample("deit_queue_depth", **tiny)
    assert scrape.value("deit_queue_depth", **tiny) == 0
    info = {"architecture": Architecture.DISTILLED.value, "dtype": "float32", "device": "cpu", "runtime": "torch"}
    assert scrape.value("deit_model_info", **tiny, **info) == 1
    assert scrape.value("deit_ready") == 1
    assert scrape.value("deit_inflight_requests") == 1  # the scrape itself
    assert scrape.value("deit_rejected_total") == 0
    assert scrape.value("deit_batch_failures_total") == 0


def test_openapi_documents_classify_and_its_errors(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/classify"]["post"]
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/ClassifyResponse"}
    for status in ("404", "413", "415", "422", "503"):
        error = operation["responses"][status]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorBody"}, status
    assert set(operation["requestBody"]["content"]) >= {"multipart/form-data", "image/*"}
    assert {p["name"] for p in operation["parameters"]} >= {"model", "top_k"}
    schemas = spec["components"]["schemas"]
    assert set(schemas["ClassifyResponse"]["properties"]) == {"model", "results"}
    assert set(schemas["Prediction"]["properties"]) == {"label", "index", "score"}
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in docs.text
    scrape = Scrape.parse(client.get("/metrics").text)
    assert scrape.value("deit_requests_total", model="", endpoint="/openapi.json", status="200") >= 1
    assert scrape.value("deit_requests_total", model="", endpoint="/docs", status="200") >= 1
    client.get("/no-such-page")
    scrape = Scrape.parse(client.get("/metrics").text)
    assert scrape.value("deit_requests_total", model="", endpoint="unmatched", status="404") >= 1


def test_openapi_documents_the_protocol_routes_with_typed_schemas(client: TestClient) -> None:
    """The Open Inference Protocol and Hugging Face routes: named response models, their request bodies, and
    errors in their ``{"error": "<message>"}`` shape (not FastAPI's own validation body)."""
    spec = client.get("/openapi.json").json()
    paths, schemas = spec["paths"], spec["components"]["schemas"]

    def ok(path: str, method: str = "get") -> Any:
        return paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]

    assert ok("/v2") == {"$ref": "#/components/schemas/ServerMetadata"}
    assert ok("/v2/health/ready") == {"$ref": "#/components/schemas/Ready"}
    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        assert ok(prefix) == {"$ref": "#/components/schemas/ModelMetadata"}
        assert ok(f"{prefix}/ready") == {"$ref": "#/components/schemas/ModelReady"}
        assert ok(f"{prefix}/config") == {"$ref": "#/components/schemas/ModelConfig"}
        infer = paths[f"{prefix}/infer"]["post"]
        assert ok(f"{prefix}/infer", "post") == {"$ref": "#/components/schemas/InferResponse"}
        assert "application/octet-stream" in infer["responses"]["200"]["content"]
        body = infer["requestBody"]["content"]
        assert set(body) == {"application/json", "application/octet-stream"}
        assert body["application/json"]["schema"]["required"] == ["inputs"]
        tensor = body["application/json"]["schema"]["properties"]["inputs"]["items"]
        assert set(tensor["properties"]) == {"name", "datatype", "shape", "parameters", "data"}
        assert "inference-header-content-length" in {p["name"] for p in infer["parameters"]}
        for suffix in ("", "/ready", "/config", "/infer"):
            operation = next(iter(paths[prefix + suffix].values()))
            versions = [p["in"] for p in operation["parameters"] if p["name"] == "model_version"]
            assert versions == (["path"] if "{model_version}" in prefix else []), prefix + suffix
    metadata_fields = {"name", "versions", "platform", "inputs", "outputs", "tasks", "hub_id", "revision", "runtime"}
    assert set(schemas["ModelMetadata"]["properties"]) == metadata_fields
    assert ok("/v2/repository/index", "post") == {
        "type": "array",
        "items": {"$ref": "#/components/schemas/RepositoryIndexEntry"},
        "title": "Response Repository Index V2 Repository Index Post",
    }
    assert set(schemas["InferResponse"]["properties"]) == {"model_name", "model_version", "id", "outputs"}
    for path in ("/", "/models/{model_name}"):
        operation = paths[path]["post"]
        assert set(operation["requestBody"]["content"]) >= {"application/json", "image/*"}
        assert set(operation["requestBody"]["content"]["application/json"]["schema"]["properties"]) == {
            "inputs",
            "parameters",
        }
        assert "HFPrediction" in str(ok(path, "post"))
    assert set(schemas["HFPrediction"]["properties"]) == {"label", "score"}
    for path, methods in paths.items():
        if path == "/" or path.startswith(("/v2", "/models/")):
            for operation in methods.values():
                for status, response in operation["responses"].items():
                    if status.startswith(("4", "5")):
                        error = response["content"]["application/json"]["schema"]
                        assert error == {"$ref": "#/components/schemas/PlainErrorBody"}, (path, status)
    assert schemas["PlainErrorBody"]["properties"]["error"]["type"] == "string"


# --- lifecycle ------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_readyz_is_503_until_the_models_are_loaded(tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading runs on its own thread; a gate in front of the repository's real load keeps the service
    deterministically in the loading phase until it opens."""
    gate = threading.Event()
    load_all = Repository.load_all

    def gated(repository: Repository) -> None:
        gate.wait(timeout=60)
        load_all(repository)

    monkeypatch.setattr(Repository, "load_all", gated)
    app = create_app(_settings(tiny_store))
    transport = httpx.ASGITransport(app=app)
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            loading: asyncio.Task[None] = app.state.loading
            for _ in range(3):
                await asyncio.sleep(0.01)
                response = await c.get("/readyz")
                _assert_error(response, 503, "not_ready", "starting")
                assert response.headers["retry-after"] == "1"
                assert (await c.get("/healthz")).status_code == 200
            _assert_error(await c.post("/classify", files=[_png_part("a.png", _PNG)]), 503, "not_ready", "loading")
            assert (await c.get("/v1/models")).json() == {"models": []}
            assert Scrape.parse((await c.get("/metrics")).text).value("deit_ready") == 0
            assert not loading.done()

            gate.set()
            await asyncio.wait_for(loading, timeout=60)
            assert (await c.get("/readyz")).json() == {"status": "ready"}
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.post("/classify", files=[_png_part("a.png", _PNG)])).status_code == 200
    finally:
        gate.set()


@pytest.mark.asyncio
@pytest.mark.parametrize("broken", ["empty store", "invalid config.json"])
async def test_a_store_that_cannot_load_fails_readiness_and_reports_fatal(tmp_path: Path, broken: str) -> None:
    store = tmp_path / "store"
    store.mkdir()
    if broken == "invalid config.json":
        write_tiny_model(store / "tiny")
        (store / "tiny" / "config.json").write_text("{not json")
    failures: list[str] = []
    app = create_app(_settings(store), on_fatal=lambda: failures.append("fatal"))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        await asyncio.wait_for(app.state.loading, timeout=60)
        assert failures == ["fatal"]
        expected = "holds no models" if broken == "empty store" else "config.json"
        _assert_error(await c.get("/readyz"), 503, "not_ready", "failed", expected)
        assert (await c.get("/healthz")).status_code == 200
