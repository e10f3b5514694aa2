"""Every runtime on a real server process answers as torch does: /classify, /embed, the Open Inference Protocol
and the Hugging Face API within float32 1e-4 of a torch server on the same checkpoint, under concurrent requests;
the runtime is reported in /v1/models, V2 metadata and config, and a metric label; the non-finite guard answers
500 on any runtime; and unloading a model served by a runtime gives its memory back."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving import (
    Scrape,
    ServerProcess,
    SharedServers,
    image_bytes,
    multipart,
    noise_image_bytes,
    overflowing_head,
    run_server,
    settled_rss,
    wait_until,
    write_big_model,
)

RUNTIMES = ("openvino", "onnxruntime")
READY_S = 240.0  # each start exports its models (seconds each on a busy CPU) before it is ready
TOLERANCE = 1e-4
IMAGES = [noise_image_bytes(seed) for seed in range(6)]


def _env(runtime: str, cache: Path) -> dict[str, str]:
    return {"DEIT_DEVICE": "cpu", "DEIT_DTYPE": "float32", "DEIT_TORCH_THREADS": "1", "DEIT_MAX_BATCH_SIZE": "8",
            "DEIT_RUNTIME": runtime, "DEIT_RUNTIME_CACHE": str(cache)}  # fmt: skip


@pytest.fixture(scope="module")
def runtime_cache(servers: SharedServers) -> Path:
    """One artefact cache for every server of this module, as long-lived as the shared servers (whose settings name
    it): a checkpoint already exported for a runtime is read, not exported again, by the next server that loads it."""
    return servers.workdir / "runtime-cache"


@pytest.fixture
def runtime_servers(servers: SharedServers, tiny_store: Path, runtime_cache: Path) -> dict[str, ServerProcess]:
    """One server per runtime (torch the reference) on the suite's tiny store, from the shared servers: these checks
    neither change the store nor stop a server."""
    return {
        runtime: servers.get(tiny_store, _env(runtime, runtime_cache), ready_timeout=READY_S)
        for runtime in ("torch", *RUNTIMES)
    }


def _scores(server: ServerProcess, images: list[bytes], model: str = "tiny") -> list[list[float]]:
    params: dict[str, Any] = {"top_k": 10, "model": model}
    r = httpx.post(f"{server.url}/classify", params=params, files=multipart(images), timeout=60)
    assert r.status_code == 200, r.text
    return [[p["score"] for p in sorted(res["predictions"], key=lambda p: p["index"])] for res in r.json()["results"]]


def _embed(server: ServerProcess, images: list[bytes], pooling: str) -> list[list[float]]:
    r = httpx.post(f"{server.url}/embed", params={"pooling": pooling}, files=multipart(images), timeout=60)
    assert r.status_code == 200, r.text
    return [res["embedding"] for res in r.json()["results"]]


def _v2(server: ServerProcess, images: list[bytes]) -> dict[str, list[float]]:
    body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                    "data": [base64.b64encode(i).decode() for i in images]}],
        "outputs": [{"name": "probabilities"}, {"name": "logits"}, {"name": "embedding"}],
    }  # fmt: skip
    r = httpx.post(f"{server.url}/v2/models/tiny/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return {out["name"]: out["data"] for out in r.json()["outputs"]}


def _hf(server: ServerProcess, image: bytes) -> dict[str, float]:
    r = httpx.post(f"{server.url}/models/tiny", content=image, headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    return {p["label"]: p["score"] for p in r.json()}


def _close(got: list[Any], want: list[Any]) -> None:
    flat_got = [x for row in got for x in (row if isinstance(row, list) else [row])]
    flat_want = [x for row in want for x in (row if isinstance(row, list) else [row])]
    assert len(flat_got) == len(flat_want)
    worst = max(abs(a - b) for a, b in zip(flat_got, flat_want, strict=True))
    assert worst <= TOLERANCE, worst


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_classify_embed_v2_and_hf_answer_as_torch_does(runtime: str, runtime_servers: dict[str, ServerProcess]) -> None:
    reference, server = runtime_servers["torch"], runtime_servers[runtime]
    _close(_scores(server, IMAGES), _scores(reference, IMAGES))
    for pooling in ("cls_distillation", "cls", "mean", "distillation"):
        _close(_embed(server, IMAGES, pooling), _embed(reference, IMAGES, pooling))
    got, want = _v2(server, IMAGES), _v2(reference, IMAGES)
    assert set(got) == set(want) == {"probabilities", "logits", "embedding"}
    for name in want:
        _close(got[name], want[name])
    got_hf, want_hf = _hf(server, IMAGES[0]), _hf(reference, IMAGES[0])
    assert list(got_hf) == list(want_hf)  # the same ranking
    _close(list(got_hf.values()), list(want_hf.values()))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_concurrent_requests_share_batches_and_each_gets_its_own_answer(
    runtime: str, runtime_servers: dict[str, ServerProcess]
) -> None:
    reference, server = runtime_servers["torch"], runtime_servers[runtime]
    want = _scores(reference, IMAGES)
    before = Scrape.parse(httpx.get(f"{server.url}/metrics", timeout=10).text)
    requests = [[IMAGES[i % 6]] for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda images: _scores(server, images), requests))
    for i, answer in enumerate(answers):
        _close(answer, [want[i % 6]])
    after = Scrape.parse(httpx.get(f"{server.url}/metrics", timeout=10).text)
    images = after.value("deit_batch_size_sum") - before.value("deit_batch_size_sum")
    batches = after.value("deit_batch_size_count") - before.value("deit_batch_size_count")
    assert images == 24
    assert 1 <= batches <= 24


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_runtime_is_reported_in_models_metadata_config_and_metrics(
    runtime: str, runtime_servers: dict[str, ServerProcess]
) -> None:
    server = runtime_servers[runtime]
    (info,) = httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"]
    assert info["runtime"]["name"] == runtime
    assert info["runtime"]["precision"] == "float32"
    assert info["runtime"]["reason"].startswith(f"--runtime {runtime}; agrees with torch float32 on the probes")
    assert info["parameters"] > 0  # counted before the torch weights were freed
    metadata = httpx.get(f"{server.url}/v2/models/tiny", timeout=10).json()
    assert metadata["runtime"] == info["runtime"]
    config = httpx.get(f"{server.url}/v2/models/tiny/config", timeout=10).json()
    assert config["backend"] == runtime
    assert config["parameters"]["runtime"] == {"string_value": runtime}
    assert config["parameters"]["precision"] == {"string_value": "float32"}
    scrape = Scrape.parse(httpx.get(f"{server.url}/metrics", timeout=10).text)
    assert scrape.value("deit_model_info", model="tiny", runtime=runtime, precision="float32") == 1
    assert not scrape.has_sample("deit_model_info", runtime="torch")
    loaded = [r for r in server.log_records() if r.get("message") == "model loaded"]
    assert [r["runtime"] for r in loaded] == [f"{runtime} float32"]
    torch_config = httpx.get(f"{runtime_servers['torch'].url}/v2/models/tiny/config", timeout=10).json()
    assert torch_config["backend"] == "pytorch"


@pytest.fixture(scope="module", params=RUNTIMES)
def unwarmed(
    request: pytest.FixtureRequest, tiny_store: Path, runtime_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server per runtime without warm-up, its store holding ``tiny`` and ``broken`` (logits that overflow), into
    which the memory check puts a big model."""
    root = tmp_path_factory.mktemp(f"unwarmed-{request.param}")
    shutil.copytree(tiny_store / "tiny", root / "store" / "tiny")
    overflowing_head(shutil.copytree(tiny_store / "tiny", root / "store" / "broken"))
    env = {**_env(request.param, runtime_cache), "DEIT_WARMUP": "false"}
    with run_server(root / "store", root, env=env, ready_timeout=READY_S) as server:
        yield server


def test_non_finite_scores_are_a_json_500_on_every_runtime(unwarmed: ServerProcess) -> None:
    runtime = unwarmed.env["DEIT_RUNTIME"]
    response = httpx.post(f"{unwarmed.url}/classify?model=broken", files=multipart([image_bytes()]), timeout=60)
    assert response.status_code == 500, response.text
    assert response.json()["error"]["code"] == "inference_failed"
    info = httpx.get(f"{unwarmed.url}/v1/models/broken", timeout=10).json()
    assert info["runtime"]["name"] == runtime
    assert "not compared with torch" in info["runtime"]["reason"]
    scrape = Scrape.parse(httpx.get(f"{unwarmed.url}/metrics", timeout=10).text)
    assert scrape.value("deit_nonfinite_outputs_total", model="broken") == 1


def test_unloading_a_runtime_model_gives_its_memory_back(unwarmed: ServerProcess, tmp_path: Path) -> None:
    server, runtime = unwarmed, unwarmed.env["DEIT_RUNTIME"]
    store = Path(server.env["DEIT_MODEL_STORE"])
    staged = write_big_model(tmp_path / "big")
    pid = server.process.pid
    for _ in range(3):
        _scores(server, IMAGES[:1], model="tiny")
    shutil.copytree(staged, store / "big")
    reads, before, loaded = [], 0, 0
    for attempt in (1, 2):  # the first load exports big, the second reads the exported artefact from the cache
        if attempt == 2:
            # Measured from here: the first export imported the exporter's modules, once for the process's life
            # (the tiny model's artefact came from the cache); what a load/unload cycle leaves behind shows below.
            before = settled_rss(pid)
        assert _repository(server, "big", "load").status_code == 200
        reads.append(_cache_reads(server))
        for _ in range(3):
            _scores(server, IMAGES[:2], model="big")
        loaded = settled_rss(pid)
        assert _repository(server, "big", "unload").status_code == 200
        wait_until(lambda n=attempt: _unloads(server) == n, what=f"unload {attempt}")  # type: ignore[misc]
    after = settled_rss(pid)
    assert reads[1] == reads[0] + 1, "the second load of big reads the cache"
    grown = loaded - before
    print(f"{runtime} rss: before {before / 2**20:.1f} MiB, loaded {loaded / 2**20:.1f} MiB, "
          f"after unload {after / 2**20:.1f} MiB")  # fmt: skip
    assert grown > 30 * 2**20, "the big model should show in the RSS"
    assert after <= before * 1.10, f"RSS after unload {after} is not within 10% of {before}"


def _cache_reads(server: ServerProcess) -> int:
    return sum(r.get("message") == "runtime artefact read from the cache" for r in server.log_records())


def _unloads(server: ServerProcess) -> int:
    return sum(r.get("message") == "model unloaded" for r in server.log_records())


def _repository(server: ServerProcess, model: str, action: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/repository/models/{model}/{action}", timeout=READY_S)
