"""Embeddings from every model kind: equal to transformers' hidden states and pooler, over /embed and the Open
Inference Protocol, from the same forward passes as classification."""

from __future__ import annotations

import asyncio
import base64
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from torch import Tensor
from transformers import DeiTModel, PreTrainedModel

from service.api import results
from service.engine.context import RequestContext
from service.engine.decode_pool import DecodePool
from service.engine.repository import Repository
from service.engine.runner import Outputs, checkpoint_forward
from service.metrics import Metrics
from service.model.checkpoints import load_checkpoint
from service.model.decoding import decode_image
from service.model.pooling import LOGITS, Pooling, default_pooling, pool, poolings
from service.model.preprocessing import Preprocessor
from service.settings import Settings
from tests.factories import TINY, hf_model, save_hf
from tests.profiles import ZOO_AUTH, ZOO_EMBEDDERS, embedding_reference, model_zoo, zoo_server
from tests.serving import ServerProcess, SharedServers, image_bytes

ATOL = 1e-4
NATIVE = (TINY["image_size"], TINY["image_size"])
RESOLUTIONS = [NATIVE, (40, 40), (24, 36)]  # the last two take the position-embedding interpolation path
KINDS = ["distilled", "single_head", "vit", "bare", "bare_no_pooler", "mim"]
NATURAL = {
    "distilled": Pooling.CLS_DISTILLATION,
    "single_head": Pooling.CLS,
    "vit": Pooling.CLS,
    "bare": Pooling.POOLER,
    "bare_no_pooler": Pooling.CLS,
    "mim": Pooling.MEAN,
}
OFFERED = {
    "distilled": {"cls", "mean", "distillation", "cls_distillation"},
    "single_head": {"cls", "mean", "distillation", "cls_distillation"},
    "vit": {"cls", "mean"},
    "bare": {"cls", "mean", "distillation", "cls_distillation", "pooler"},
    "bare_no_pooler": {"cls", "mean", "distillation", "cls_distillation"},
    "mim": {"cls", "mean", "distillation", "cls_distillation"},
}


def _reference_model(kind: str, seed: int) -> PreTrainedModel:
    model: PreTrainedModel = embedding_reference(kind, seed)
    return model


def _reference_vectors(model: PreTrainedModel, x: Tensor) -> dict[str, Tensor]:
    """Every pooling, from transformers' own last_hidden_state and pooler_output."""
    encoder = model if isinstance(model, DeiTModel) else getattr(model, "deit", None) or model.vit
    with torch.inference_mode():
        out = encoder(x, interpolate_pos_encoding=True)
    hidden = out.last_hidden_state
    two_tokens = model.config.model_type == "deit"
    vectors = {"cls": hidden[:, 0], "mean": hidden[:, 2 if two_tokens else 1 :].mean(dim=1)}
    if two_tokens:
        vectors["distillation"] = hidden[:, 1]
        vectors["cls_distillation"] = (hidden[:, 0] + hidden[:, 1]) / 2  # timm's pre-logits of a distilled DeiT
    if out.pooler_output is not None:
        vectors["pooler"] = out.pooler_output
    return vectors


def _inputs(height: int, width: int, batch: int = 3) -> Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height * 100 + width))


@pytest.mark.parametrize("kind", KINDS)
def test_every_pooling_matches_transformers(kind: str, tmp_path: Path) -> None:
    reference = _reference_model(kind, seed=7)
    checkpoint = load_checkpoint(save_hf(reference, tmp_path / kind), dtype="float32")
    config = checkpoint.config
    assert set(poolings(config)) == OFFERED[kind]
    assert poolings(config)[0] is default_pooling(config) is NATURAL[kind]
    forward = checkpoint_forward(checkpoint)
    for height, width in RESOLUTIONS:
        x = _inputs(height, width)
        expected = _reference_vectors(reference, x)
        assert set(expected) == OFFERED[kind]
        outputs = forward(list(x))
        for pooling in poolings(config):
            ours = pool(outputs, pooling)
            want = expected[pooling]
            assert want.std() > 0.05  # a real, varied reference
            assert not torch.allclose(want[0], want[1], atol=1e-2)
            assert ours.dtype == torch.float32
            assert ours.shape == want.shape
            diff = (ours - want).abs().max().item()
            print(f"parity {kind}/{pooling} {height}x{width}: max |ours - transformers| = {diff:.2e}")
            assert diff < ATOL
        if config.architecture.classifies:  # the same pass gave the class logits, equal to the model's forward
            with torch.inference_mode():
                torch.testing.assert_close(outputs[LOGITS], checkpoint.model(x), atol=1e-5, rtol=0)
        else:
            assert LOGITS not in outputs


def test_normalize_gives_unit_vectors_in_the_same_direction(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(save_hf(hf_model("distilled", seed=2), tmp_path / "m"))
    outputs = checkpoint_forward(checkpoint)(list(_inputs(*NATIVE)))
    raw, unit = pool(outputs, Pooling.MEAN), pool(outputs, Pooling.MEAN, normalize=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(unit * raw.norm(dim=-1, keepdim=True), raw)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-2)


# --- a real server: one store with a model of every kind --------------------------------------------------------

SERVED = {kind: kind for kind in ZOO_EMBEDDERS}  # kind: its name in the store
IMAGES = [image_bytes((48, 40), (200, 30, 30)), image_bytes((40, 52), (20, 160, 90), "JPEG")]


@pytest.fixture(scope="module")
def references() -> dict[str, PreTrainedModel]:
    """The transformers models the store's embedding models were saved from (the same seeds)."""
    return {kind: _reference_model(kind, seed=ZOO_EMBEDDERS[kind]) for kind in SERVED}


@pytest.fixture(scope="module")
def store(servers: SharedServers) -> Path:
    """The store of the ``ZOO`` server: among its models, one of every kind named in ``SERVED``."""
    return model_zoo(servers.workdir)


@pytest.fixture(scope="module")
def server(store: Path, servers: SharedServers) -> ServerProcess:
    # Warm-up on (the default): headless models must pass it too. Shared (``ZOO``): requests carry its key.
    return zoo_server(servers)


def _embed(server: ServerProcess, model: str, images: list[bytes] = IMAGES, **params: Any) -> httpx.Response:
    files = [("file", (f"img{i}", data)) for i, data in enumerate(images)]
    headers = {**ZOO_AUTH, **params.pop("headers", {})}
    return httpx.post(
        f"{server.url}/embed", params={"model": model, **params}, files=files, headers=headers, timeout=60
    )


def _pixels(store: Path, model: str) -> Tensor:
    """The uploads preprocessed exactly as the service does, for the in-process reference."""
    preprocessor = Preprocessor(load_checkpoint(store / model).preprocess)
    return torch.stack([preprocessor(decode_image(data, 10**6, preprocessor.draft_size)) for data in IMAGES])


def test_models_list_says_what_each_model_serves(server: ServerProcess) -> None:
    listed = httpx.get(f"{server.url}/v1/models", headers=ZOO_AUTH, timeout=10).json()["models"]
    models = {m["name"]: m for m in listed}
    assert models["distilled"]["tasks"] == ["classify", "embed"]
    assert models["vit"]["tasks"] == ["classify", "embed"]
    for headless in ("bare", "bare_no_pooler", "mim"):
        assert models[headless]["tasks"] == ["embed"]
        assert models[headless]["num_labels"] == 0
    for kind, name in SERVED.items():
        assert models[name]["embedding_dim"] == TINY["hidden_size"]
        assert models[name]["poolings"][0] == NATURAL[kind].value
        assert set(models[name]["poolings"]) == OFFERED[kind]


@pytest.mark.parametrize("kind", list(SERVED))
def test_embed_equals_transformers_for_every_kind_and_pooling(
    kind: str, server: ServerProcess, store: Path, references: dict[str, PreTrainedModel]
) -> None:
    expected = _reference_vectors(references[kind], _pixels(store, SERVED[kind]))
    default = _embed(server, SERVED[kind])
    assert default.status_code == 200, default.text
    body = default.json()
    assert (body["pooling"], body["dim"], body["normalized"], body["encoding"]) == (
        NATURAL[kind].value, TINY["hidden_size"], False, "float",
    )  # fmt: skip
    assert [r["filename"] for r in body["results"]] == ["img0", "img1"]
    for pooling in OFFERED[kind]:
        r = _embed(server, SERVED[kind], pooling=pooling)
        assert r.status_code == 200, r.text
        got = torch.tensor([row["embedding"] for row in r.json()["results"]])
        diff = (got - expected[pooling]).abs().max().item()
        print(f"server parity {kind}/{pooling}: max |ours - transformers| = {diff:.2e}")
        assert diff < ATOL
    natural = torch.tensor([row["embedding"] for row in body["results"]])
    assert (natural - expected[NATURAL[kind].value]).abs().max().item() < ATOL


def test_classify_on_a_headless_model_is_a_400_naming_embed(server: ServerProcess) -> None:
    for name in ("bare", "mim"):
        files = [("file", ("a.png", IMAGES[0]))]
        r = httpx.post(f"{server.url}/classify", params={"model": name}, files=files, headers=ZOO_AUTH, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "task_not_supported"
        assert "/embed" in error["message"]
        assert name in error["message"]
    ok = httpx.post(f"{server.url}/classify", params={"model": "distilled"}, files=files, headers=ZOO_AUTH, timeout=30)
    assert ok.status_code == 200, ok.text


def test_unknown_or_unavailable_pooling_is_refused_naming_the_choices(server: ServerProcess) -> None:
    for model, pooling in [("vit", "distillation"), ("distilled", "pooler"), ("mim", "max")]:
        r = _embed(server, model, pooling=pooling)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_parameter"
        assert repr(pooling) in error["message"]
        assert "cls" in error["message"]


def test_normalize_true_gives_unit_vectors(server: ServerProcess) -> None:
    raw = torch.tensor([row["embedding"] for row in _embed(server, "bare_no_pooler").json()["results"]])
    r = _embed(server, "bare_no_pooler", normalize="true")
    assert r.json()["normalized"] is True
    unit = torch.tensor([row["embedding"] for row in r.json()["results"]])
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(unit, raw / raw.norm(dim=-1, keepdim=True))


def test_octet_stream_and_base64_round_trip_the_json_floats(server: ServerProcess) -> None:
    floats = np.array([row["embedding"] for row in _embed(server, "distilled").json()["results"]], dtype=np.float32)
    raw = _embed(server, "distilled", headers={"Accept": "application/octet-stream"})
    assert raw.status_code == 200, raw.text
    assert raw.headers["content-type"] == "application/octet-stream"
    assert raw.headers["x-embedding-shape"] == f"2,{TINY['hidden_size']}"
    assert raw.headers["x-embedding-dtype"] == "float32"
    assert raw.headers["x-embedding-pooling"] == "cls_distillation"
    assert len(raw.content) == 2 * TINY["hidden_size"] * 4
    np.testing.assert_array_equal(np.frombuffer(raw.content, dtype="<f4").reshape(2, -1), floats)
    b64 = _embed(server, "distilled", encoding="base64")
    assert b64.json()["encoding"] == "base64"
    decoded = np.stack([np.frombuffer(base64.b64decode(r["embedding"]), "<f4") for r in b64.json()["results"]])
    np.testing.assert_array_equal(decoded, floats)
    both = _embed(server, "distilled", encoding="base64", headers={"Accept": "application/octet-stream"})
    assert both.status_code == 422
    assert both.json()["error"]["code"] == "invalid_parameter"
    prefers_json = _embed(server, "distilled", headers={"Accept": "application/json, application/octet-stream"})
    assert prefers_json.headers["content-type"] == "application/json"


def _v2_infer(server: ServerProcess, model: str, outputs: list[dict[str, Any]] | None) -> httpx.Response:
    request: dict[str, Any] = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [len(IMAGES)],
                "data": [base64.b64encode(d).decode() for d in IMAGES],
                "parameters": {"content_type": "base64"},
            }
        ]
    }
    if outputs is not None:
        request["outputs"] = outputs
    return httpx.post(f"{server.url}/v2/models/{model}/infer", json=request, headers=ZOO_AUTH, timeout=60)


def _v2_output(response: httpx.Response, name: str) -> np.ndarray:
    assert response.status_code == 200, response.text
    entry = next(o for o in response.json()["outputs"] if o["name"] == name)
    assert entry["datatype"] == "FP32"
    return np.array(entry["data"], dtype=np.float32).reshape(entry["shape"])


def test_v2_embedding_output_equals_embed(server: ServerProcess) -> None:
    for model, pooling in [("distilled", None), ("distilled", "mean"), ("bare", None), ("mim", "cls")]:
        params: dict[str, Any] = {} if pooling is None else {"pooling": pooling}
        embed = np.array([r["embedding"] for r in _embed(server, model, **params).json()["results"]], np.float32)
        r = _v2_infer(server, model, [{"name": "embedding", "parameters": params}])
        assert [o["name"] for o in r.json()["outputs"]] == ["embedding"]
        np.testing.assert_array_equal(_v2_output(r, "embedding"), embed)
    # With the class scores, from the same pass: both as their own requests give them.
    both = _v2_infer(
        server, "distilled", [{"name": "logits"}, {"name": "embedding", "parameters": {"normalize": True}}]
    )
    unit = np.array([r["embedding"] for r in _embed(server, "distilled", normalize="true").json()["results"]])
    np.testing.assert_allclose(_v2_output(both, "embedding"), unit, atol=1e-6)
    only_logits = _v2_output(_v2_infer(server, "distilled", [{"name": "logits"}]), "logits")
    np.testing.assert_array_equal(_v2_output(both, "logits"), only_logits)


def test_v2_headless_model_gives_the_embedding_and_refuses_class_scores(server: ServerProcess) -> None:
    meta = httpx.get(f"{server.url}/v2/models/bare", headers=ZOO_AUTH, timeout=10).json()
    assert meta["tasks"] == ["embed"]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, TINY["hidden_size"]]}]
    classifier = httpx.get(f"{server.url}/v2/models/distilled", headers=ZOO_AUTH, timeout=10).json()
    assert [o["name"] for o in classifier["outputs"]] == ["probabilities", "logits", "embedding"]
    assert classifier["tasks"] == ["classify", "embed"]
    default = _v2_infer(server, "bare", None)  # none requested: what the model gives
    embed = np.array([r["embedding"] for r in _embed(server, "bare").json()["results"]], np.float32)
    np.testing.assert_array_equal(_v2_output(default, "embedding"), embed)
    refused = _v2_infer(server, "bare", [{"name": "probabilities"}])
    assert refused.status_code == 400, refused.text
    assert "classification head" in refused.json()["error"]


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{what}: not within {timeout_s}s")


@pytest.mark.asyncio
async def test_classify_and_embed_requests_share_one_forward_pass(store: Path, tmp_path: Path) -> None:
    """While the model is busy, three images to classify and three to embed queue up; they run as ONE batch of six,
    and each request gets what it would alone."""
    own = shutil.copytree(store / "distilled", tmp_path / "store" / "distilled").parent  # only the model it runs
    values: dict[str, Any] = {"model_store": own, "device": "cpu", "dtype": "float32", "warmup": False}
    settings = Settings(**values, forward_workers=1, max_batch_delay_ms=0)
    metrics = Metrics(settings.max_batch_size)
    repository = Repository.open(settings, metrics, DecodePool(1))
    repository.load_all()
    served = repository.store.get("distilled")
    runner = served.batcher.runner
    real, gate, sizes = runner.forward, threading.Event(), []

    def gated(pixels: Sequence[Tensor]) -> Outputs:
        sizes.append(len(pixels))
        if not gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        return real(pixels)

    runner.forward = gated
    x = _inputs(*NATIVE, batch=7)
    served.start()
    try:
        holder = asyncio.create_task(served.infer(x[:1], RequestContext.with_timeout(30)))
        await _until(lambda: sizes == [1], "the holding batch started")
        classified = asyncio.create_task(served.infer(x[1:4], RequestContext.with_timeout(30)))
        embedded = asyncio.create_task(served.infer(x[4:], RequestContext.with_timeout(30)))
        depth = {"model": "distilled", "version": "1"}
        await _until(lambda: metrics.registry.get_sample_value("deit_queue_depth", depth) == 6, "six queued behind it")
        gate.set()
        await holder
        logits = results.logits(await classified)
        vectors = results.embeddings(await embedded, Pooling.MEAN, normalize=False)
    finally:
        gate.set()
        await served.stop()
    assert sizes == [1, 6]
    alone = real(list(x))
    torch.testing.assert_close(logits, alone[LOGITS][1:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(vectors, pool(alone, Pooling.MEAN)[4:], atol=1e-5, rtol=0)
