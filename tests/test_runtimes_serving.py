"""Every runtime on a real server process answers as torch does: /classify, /embed, the Open Inference Protocol
and the Hugging Face API within float32 1e-4 of a torch server on the same checkpoint, under concurrent requests;
the runtime is reported in /v1/models, V2 metadata and config, and a metric label; the non-finite guard answers
500 on any runtime; and unloading a model served by a runtime gives its memory back. One server per runtime, warm-up
off, on a store holding ``tiny`` and a ``broken`` model whose scores are not finite."""

from __future__ import annotations

import base64
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.profiles import KEYED_AUTH, keyed_server
from tests.serving import (
    ServerProcess,
    SharedServers,
    image_bytes,
    multipart,
    noise_image_bytes,
    overflowing_head,
    scrape,
    settled_rss,
    wait_until,
    write_big_model,
)

RUNTIMES = ("openvino", "onnxruntime")
READY_S = 240.0  # each start exports its models (seconds each on a busy CPU) before it is ready
TOLERANCE = 1e-4
IMAGES = [noise_image_bytes(seed) for seed in range(6)]


def _env(runtime: str, cache: Path) -> dict[str, str]:
    """Warm-up off: it would refuse ``broken`` (its scores are not finite) before the guard could answer for it;
    ``tiny`` the default, as on the reference (the first in the store would be ``broken``). A home directory of
    its own, empty, and no sign of a CI job (``CI``, ``TF_BUILD``, ``JENKINS_URL``: OpenVINO's usage reports stay off
    in one by themselves), so that what a runtime would write or send from a server elsewhere shows here."""
    home = cache.parent / f"home-{runtime}"
    home.mkdir(parents=True, exist_ok=True)
    return {"DEIT_DEVICE": "cpu", "DEIT_DTYPE": "float32", "DEIT_TORCH_THREADS": "1", "DEIT_MAX_BATCH_SIZE": "8",
            "DEIT_RUNTIME": runtime, "DEIT_RUNTIME_CACHE": str(cache), "DEIT_WARMUP": "false",
            "DEIT_DEFAULT_MODEL": "tiny", "HOME": str(home), "CI": "", "TF_BUILD": "", "JENKINS_URL": ""}  # fmt: skip


@pytest.fixture(scope="module")
def runtime_cache(servers: SharedServers) -> Path:
    """One artefact cache for every server of this module, as long-lived as the shared servers (whose settings name
    it): a checkpoint already exported for a runtime is read, not exported again, by the next server that loads it."""
    return servers.workdir / "runtime-cache"


@pytest.fixture(scope="module")
def runtime_store(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite's ``tiny`` and ``broken`` (the same with logits that overflow), into which the memory check puts a
    big model once the servers run."""
    store = tmp_path_factory.mktemp("runtime-store")
    shutil.copytree(tiny_store / "tiny", store / "tiny")
    overflowing_head(shutil.copytree(tiny_store / "tiny", store / "broken"))
    return store


@pytest.fixture
def runtime_servers(
    servers: SharedServers, tiny_store: Path, runtime_store: Path, runtime_cache: Path
) -> dict[str, ServerProcess]:
    """One server per runtime on ``runtime_store``, and the reference: torch on the same ``tiny`` checkpoint in
    float32 (the shared ``KEYED`` server, whose key ``_auth`` sends)."""
    return {
        "torch": keyed_server(servers, tiny_store),
        **{
            runtime: servers.get(runtime_store, _env(runtime, runtime_cache), ready_timeout=READY_S)
            for runtime in RUNTIMES
        },
    }


def _auth(server: ServerProcess) -> dict[str, str]:
    return KEYED_AUTH if "DEIT_API_KEYS" in server.env else {}


def _scores(server: ServerProcess, images: list[bytes], model: str = "tiny") -> list[list[float]]:
    params: dict[str, Any] = {"top_k": 10, "model": model}
    files = multipart(images)
    r = httpx.post(f"{server.url}/classify", params=params, files=files, headers=_auth(server), timeout=60)
    assert r.status_code == 200, r.text
    return [[p["score"] for p in sorted(res["predictions"], key=lambda p: p["index"])] for res in r.json()["results"]]


def _embed(server: ServerProcess, images: list[bytes], pooling: str) -> list[list[float]]:
    params = {"pooling": pooling}
    r = httpx.post(f"{server.url}/embed", params=params, files=multipart(images), headers=_auth(server), timeout=60)
    assert r.status_code == 200, r.text
    return [res["embedding"] for res in r.json()["results"]]


def _v2(server: ServerProcess, images: list[bytes]) -> dict[str, list[float]]:
    body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                    "data": [base64.b64encode(i).decode() for i in images]}],
        "outputs": [{"name": "probabilities"}, {"name": "logits"}, {"name": "embedding"}],
    }  # fmt: skip
    r = httpx.post(f"{server.url}/v2/models/tiny/infer", json=body, headers=_auth(server), timeout=60)
    assert r.status_code == 200, r.text
    return {out["name"]: out["data"] for out in r.json()["outputs"]}


def _hf(server: ServerProcess, image: bytes) -> dict[str, float]:
    headers = {"Content-Type": "image/png", **_auth(server)}
    r = httpx.post(f"{server.url}/models/tiny", content=image, headers=headers, timeout=60)
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
    before = scrape(server)
    requests = [[IMAGES[i % 6]] for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda images: _scores(server, images), requests))
    for i, answer in enumerate(answers):
        _close(answer, [want[i % 6]])
    after = scrape(server)
    images = after.value("deit_batch_size_sum") - before.value("deit_batch_size_sum")
    batches = after.value("deit_batch_size_count") - before.value("deit_batch_size_count")
    assert images == 24
    assert 1 <= batches <= 24


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_runtime_is_reported_in_models_metadata_config_and_metrics(
    runtime: str, runtime_servers: dict[str, ServerProcess]
) -> None:
    server = runtime_servers[runtime]
    info = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"]}["tiny"]
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
    page = scrape(server)
    assert page.value("deit_model_info", model="tiny", runtime=runtime, precision="float32") == 1
    assert not page.has_sample("deit_model_info", runtime="torch")
    loaded = [r for r in server.log_records() if r.get("message") == "model loaded" and r.get("model") == "tiny"]
    assert [r["runtime"] for r in loaded] == [f"{runtime} float32"]
    reference = runtime_servers["torch"]
    torch_config = httpx.get(f"{reference.url}/v2/models/tiny/config", headers=_auth(reference), timeout=10).json()
    assert torch_config["backend"] == "pytorch"


def test_openvino_sends_no_usage_reports_and_writes_nothing_in_home(runtime_servers: dict[str, ServerProcess]) -> None:
    """OpenVINO's converter reports usage (a client id and counters under ~/intel, each event sent from a forked
    copy of the process) unless a consent file declines; the server declines for itself."""
    server = runtime_servers["openvino"]
    _scores(server, IMAGES[:1])
    home = Path(server.env["HOME"])
    assert sorted(p.name for p in home.rglob("*")) == []
    assert all(json.loads(line) for line in server.log().splitlines())  # the process's output: JSON lines only


def _nonfinite(server: ServerProcess) -> float:
    return scrape(server).value("deit_nonfinite_outputs_total", model="broken")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_non_finite_scores_are_a_json_500_on_every_runtime(
    runtime: str, runtime_servers: dict[str, ServerProcess]
) -> None:
    server = runtime_servers[runtime]
    before = _nonfinite(server)
    response = httpx.post(f"{server.url}/classify?model=broken", files=multipart([image_bytes()]), timeout=60)
    assert response.status_code == 500, response.text
    assert response.json()["error"]["code"] == "inference_failed"
    info = httpx.get(f"{server.url}/v1/models/broken", timeout=10).json()
    assert info["runtime"]["name"] == runtime
    assert "not compared with torch" in info["runtime"]["reason"]
    assert _nonfinite(server) == before + 1


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_unloading_a_runtime_model_gives_its_memory_back(
    runtime: str, runtime_servers: dict[str, ServerProcess], runtime_store: Path, tmp_path: Path
) -> None:
    server = runtime_servers[runtime]
    pid = server.process.pid
    unloads = _unloads(server)
    for _ in range(3):
        _scores(server, IMAGES[:1], model="tiny")
    if not (runtime_store / "big").exists():  # the first runtime's check puts it there, after every server started
        shutil.copytree(write_big_model(tmp_path / "big"), runtime_store / "big")
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
        wait_until(lambda n=unloads + attempt: _unloads(server) == n, what=f"unload {attempt}")  # type: ignore[misc]
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
