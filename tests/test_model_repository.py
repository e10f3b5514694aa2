"""The model repository on real server processes: numbered versions, load/unload/reload at run time through the
Open Inference Protocol repository extension, reloads under load, memory given back on unload, a model's drain on
unload, what a load refuses, and the poller.

One server of this module's own serves every test: each test loads, unloads and adds models of its own names in its
store, so none depends on what another did. The poller's test starts a second server, polling the same store."""

from __future__ import annotations

import base64
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.http as triton

from tests.factories import edit_config_json
from tests.profiles import assert_clean_log
from tests.serving import (
    ServerProcess,
    image_bytes,
    multipart_body,
    noise_image_bytes,
    plain_error,
    read_answer,
    rss_bytes,
    run_server,
    scrape,
    settled_rss,
    wait_until,
    write_big_model,
    write_tiny_model,
)

KEY = "repo-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
IMAGE = noise_image_bytes(5)
ENV = {"DEIT_DEVICE": "cpu", "DEIT_DTYPE": "float32", "DEIT_MAX_BATCH_SIZE": "4", "DEIT_TORCH_THREADS": "1"}
# An unload waits this long for the requests on the model it retires: short, so that a test sees the drain run out;
# ample for the milliseconds a tiny model's request takes, so that a reload under load cuts none.
DRAIN_S = 5.0


def write_version(model_dir: Path, version: int, seed: int) -> Path:
    """A version folder written aside and renamed into place, so that no reader sees it half-written."""
    staging = model_dir / f".staging-{version}-{seed}"
    write_tiny_model(staging, seed=seed)
    target = model_dir / str(version)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def scores(url: str, model: str, version: int | None = None, headers: dict[str, str] = AUTH) -> list[float]:
    """All class probabilities of IMAGE, by class index, as POST /classify answers them."""
    params: dict[str, Any] = {"model": model, "top_k": 10}
    if version is not None:
        params["version"] = version
    r = httpx.post(f"{url}/classify", params=params, content=IMAGE, headers={**headers, "Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    by_index = {p["index"]: p["score"] for p in r.json()["results"][0]["predictions"]}
    return [by_index[i] for i in range(10)]


def index(url: str, body: dict[str, Any] | None = None) -> dict[tuple[str, str], dict[str, str]]:
    r = httpx.post(f"{url}/v2/repository/index", json=body or {}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return {(row["name"], row["version"]): row for row in r.json()}


def repository(url: str, model: str, action: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v2/repository/models/{model}/{action}", headers=AUTH, timeout=timeout)


def close(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) < 1e-5 for x, y in zip(a, b, strict=True))


def load(url: str, model: str) -> None:
    r = repository(url, model, "load")
    assert r.status_code == 200, r.text


def unloaded(server: ServerProcess, model: str) -> int:
    """How many versions of ``model`` the server has drained and freed so far."""
    return sum(1 for r in server.log_records() if r.get("message") == "model unloaded" and r.get("model") == model)


# --- versions and the repository endpoints, on one server with API keys ---------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny`` in two versions and ``other`` (the default) at start; every other model is a test's own."""
    root = tmp_path_factory.mktemp("repo-store")
    write_version(root / "tiny", 1, seed=1)
    write_version(root / "tiny", 2, seed=2)
    write_tiny_model(root / "other", seed=3)
    return root


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {**ENV, "DEIT_FORWARD_WORKERS": "1", "DEIT_API_KEYS": KEY, "DEIT_DEFAULT_MODEL": "other",
           "DEIT_DRAIN_TIMEOUT_S": str(DRAIN_S)}  # fmt: skip
    with run_server(store, tmp_path_factory.mktemp("repo"), env=env) as process:
        yield process


def test_versions_are_discovered_and_the_newest_serves_by_default(server: ServerProcess) -> None:
    v1, v2 = scores(server.url, "tiny", 1), scores(server.url, "tiny", 2)
    assert not close(v1, v2)  # different weights, different answers
    assert close(scores(server.url, "tiny"), v2)
    models = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["models"]}
    assert (models["tiny"]["version"], models["tiny"]["versions"]) == (2, [1, 2])
    assert (models["other"]["version"], models["other"]["versions"], models["other"]["default"]) == (1, [1], True)
    r = httpx.post(f"{server.url}/classify", params={"model": "tiny", "version": 7}, content=IMAGE, headers=AUTH)
    assert r.status_code == 404, r.text
    assert "version 7" in r.json()["error"]["message"]


def test_v2_version_routes_serve_that_version(server: ServerProcess) -> None:
    encoded = base64.b64encode(IMAGE).decode()
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [encoded]}],
            "outputs": [{"name": "probabilities"}]}  # fmt: skip
    answers = {}
    for version in ("1", "2"):
        r = httpx.post(f"{server.url}/v2/models/tiny/versions/{version}/infer", json=body, headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == version
        answers[version] = r.json()["outputs"][0]["data"]
        assert close(answers[version], scores(server.url, "tiny", int(version)))
    plain = httpx.post(f"{server.url}/v2/models/tiny/infer", json=body, headers=AUTH, timeout=30).json()
    assert plain["model_version"] == "2"
    assert close(plain["outputs"][0]["data"], answers["2"])
    meta = httpx.get(f"{server.url}/v2/models/tiny", headers=AUTH).json()
    assert meta["versions"] == ["1", "2"]
    assert httpx.get(f"{server.url}/v2/models/tiny/versions/3", headers=AUTH).status_code == 404
    assert "model_repository" in httpx.get(f"{server.url}/v2").json()["extensions"]


def test_metrics_and_access_log_carry_the_version(server: ServerProcess) -> None:
    scores(server.url, "tiny", 1)
    page = scrape(server)
    assert page.value("deit_requests_total", model="tiny", version="1", endpoint="/classify", status="200") >= 1
    assert page.value("deit_images_total", model="tiny", version="1") >= 1
    assert page.value("deit_model_info", model="tiny", version="2") == 1
    lines = [r for r in server.log_records() if r.get("message") == "request" and r.get("path") == "/classify"]
    assert {"1", "2"} <= {str(r.get("version")) for r in lines if r.get("model") == "tiny"}


def test_repository_endpoints_need_a_key(server: ServerProcess) -> None:
    for path in ("/v2/repository/index", "/v2/repository/models/tiny/load", "/v2/repository/models/tiny/unload"):
        assert httpx.post(f"{server.url}{path}", timeout=30).status_code == 401, path
    assert index(server.url)[("tiny", "2")]["state"] == "READY"  # nothing was unloaded
    bare = httpx.post(f"{server.url}/v2/repository/index", headers=AUTH)  # no body, as curl -X POST sends
    assert bare.status_code == 200, bare.text
    assert {(row["name"], row["version"]) for row in bare.json()} == set(index(server.url))  # the whole index
    assert {("tiny", "1"), ("tiny", "2"), ("other", "1")} <= set(index(server.url))


def test_repository_index_load_and_unload(server: ServerProcess, store: Path) -> None:
    rows = index(server.url)
    assert {k: v["state"] for k, v in rows.items() if k[0] in ("tiny", "other")} == {
        ("tiny", "1"): "READY", ("tiny", "2"): "READY", ("other", "1"): "READY"}  # fmt: skip
    for action in ("load", "unload"):
        r = repository(server.url, "nope", action)
        assert r.status_code == 404, r.text
        assert "nope" in r.json()["error"]

    assert repository(server.url, "other", "unload").status_code == 200
    r = httpx.post(f"{server.url}/classify", params={"model": "other"}, content=IMAGE, headers=AUTH)
    assert r.status_code == 404, r.text
    assert index(server.url)[("other", "1")] == {"name": "other", "version": "1", "state": "UNAVAILABLE",
                                                 "reason": "unloaded"}  # fmt: skip
    assert ("other", "1") not in index(server.url, {"ready": True})
    assert repository(server.url, "other", "load").status_code == 200
    assert index(server.url)[("other", "1")]["state"] == "READY"
    assert len(scores(server.url, "other")) == 10


def test_a_failed_load_keeps_the_old_version_serving(server: ServerProcess, store: Path) -> None:
    before = scores(server.url, "tiny")
    broken = store / "tiny" / "3"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    try:
        r = repository(server.url, "tiny", "load")
        assert r.status_code == 400, r.text
        assert "config.json" in r.json()["error"]
        assert close(scores(server.url, "tiny"), before)  # version 2 still serves
        row = index(server.url)[("tiny", "3")]
        assert row["state"] == "UNAVAILABLE", row
        assert "config.json" in row["reason"]
        failures = [r for r in server.log_records() if str(r.get("message")).startswith("model load failed")]
        assert failures, server.log()
        assert (failures[-1]["model"], failures[-1]["version"]) == ("tiny", 3)
    finally:
        shutil.rmtree(broken)
    assert repository(server.url, "tiny", "load").status_code == 200
    assert ("tiny", "3") not in index(server.url)


def test_triton_client_drives_the_repository(server: ServerProcess) -> None:
    """Triton's own HTTP client lists, unloads and loads models through the extension."""
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        listed = {(m["name"], m["version"], m["state"]) for m in client.get_model_repository_index(headers=AUTH)}
        assert ("tiny", "2", "READY") in listed
        client.unload_model("other", headers=AUTH)
        assert not client.is_model_ready("other", headers=AUTH)
        client.load_model("other", headers=AUTH)
        assert client.is_model_ready("other", headers=AUTH)
        assert client.is_model_ready("tiny", model_version="1", headers=AUTH)
    finally:
        client.close()


# --- a request holds its model until it is answered; a config cannot make a load allocate without bound --------


def test_an_unload_whose_drain_runs_out_cancels_the_request_on_it_with_a_503(
    server: ServerProcess, store: Path
) -> None:
    log_mark = len(server.log())
    write_tiny_model(store / "spare", seed=4)
    load(server.url, "spare")
    body, content_type = multipart_body([b"x" * 4096])
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /classify?model=spare HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:100])  # the rest never comes: the request holds "spare" while it waits

    def admitted() -> bool:
        page = scrape(server)
        return page.value("deit_upload_bytes_in_flight") >= len(body)

    wait_until(admitted, what="the upload admitted", every=0.25)
    assert repository(server.url, "spare", "unload").status_code == 200
    with sock:
        status, answer = read_answer(sock)  # after the drain timeout (DRAIN_S), not at the request's 30 s deadline
    assert status == 503, answer
    assert answer["error"]["code"] == "model_unloaded"
    assert "spare" in answer["error"]["message"]
    assert repository(server.url, "spare", "load").status_code == 200
    files = [("file", ("a.png", image_bytes(), "image/png"))]
    assert httpx.post(f"{server.url}/classify?model=spare", files=files, headers=AUTH).status_code == 200
    assert_clean_log(server, log_mark)


def test_a_symlinked_model_directory_is_followed_out_of_the_store(
    server: ServerProcess, store: Path, tmp_path: Path
) -> None:
    outside = write_tiny_model(tmp_path / "mounted-volume" / "model", seed=5)
    (store / "linked").symlink_to(outside, target_is_directory=True)
    assert repository(server.url, "linked", "load").status_code == 200
    files = [("file", ("a.png", image_bytes(), "image/png"))]
    assert httpx.post(f"{server.url}/classify?model=linked", files=files, headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (1_000_000, "num_hidden_layers 1000000 is above the limit of 256"),
        (3, "asks for 3 encoder layers, the weights hold 2"),
    ],
    ids=["million", "one-more"],
)
def test_a_config_asking_for_more_layers_than_its_weights_is_refused_before_building(
    server: ServerProcess, store: Path, layers: int, message: str
) -> None:
    name = f"layers-{layers}"
    write_tiny_model(store / name)
    edit_config_json(store / name, num_hidden_layers=layers)
    try:
        before = rss_bytes(server.process.pid)
        response = repository(server.url, name, "load")
        error = plain_error(response, 400)
        assert message in error
        assert str(store / name) in error  # the repository API is the operator's: it names the server's files
        assert rss_bytes(server.process.pid) - before < 64 * 2**20
        assert httpx.get(f"{server.url}/v2/models/{name}", headers=AUTH).status_code == 404
    finally:
        shutil.rmtree(store / name)  # not a model any later test, or a server started on this store, should meet


# --- reloads under load ---------------------------------------------------------------------------------------


def test_reloads_and_unload_under_load_answer_every_request(server: ServerProcess, store: Path) -> None:
    live = store / "live"
    write_version(live, 1, seed=10)
    write_tiny_model(store / "steady", seed=11)
    load(server.url, "live")
    load(server.url, "steady")
    unloaded_before = unloaded(server, "live")
    stop = threading.Event()
    gone = threading.Event()  # set while "live" may be unloaded
    results: list[tuple[str, int, bool]] = []  # (model, status, whether 404 was allowed then)
    lock = threading.Lock()

    def client(n: int) -> None:
        model = "steady" if n % 4 == 0 else "live"
        with httpx.Client(timeout=30) as http:
            for _ in range(300):  # bounded: ~16 × 300 requests at most, and 120 s below
                if stop.is_set():
                    return
                allowed = gone.is_set()
                try:
                    status = http.post(f"{server.url}/classify", params={"model": model}, content=IMAGE,
                                       headers={**AUTH, "Content-Type": "image/png"}).status_code  # fmt: skip
                except httpx.HTTPError:  # a dropped connection is a failure like any other
                    status = 0
                with lock:
                    results.append((model, status, allowed or gone.is_set()))

    def current() -> list[float]:
        return scores(server.url, "live")

    seen = [current()]
    with ThreadPoolExecutor(16) as pool:
        clients = [pool.submit(client, n) for n in range(16)]
        started = time.monotonic()
        try:
            for step in range(2, 7):  # 5 reloads: three new version folders, then two in-place rewrites
                if step <= 4:
                    write_version(live, step, seed=10 + step)
                    if step >= 3:  # an old version folder goes: it unloads under load
                        shutil.rmtree(live / str(step - 2))
                else:
                    write_version(live, 4, seed=10 + step)  # same version, new weights: swap and drain
                r = repository(server.url, "live", "load")
                assert r.status_code == 200, r.text
                now = current()
                assert all(not close(now, old) for old in seen), f"reload {step} still answers old scores"
                seen.append(now)
            page = scrape(server)  # the reloaded version keeps its info
            assert page.value("deit_model_info", model="live", version="4") == 1
            gone.set()
            assert repository(server.url, "live", "unload").status_code == 200
            r = httpx.post(f"{server.url}/classify", params={"model": "live"}, content=IMAGE, headers=AUTH)
            assert r.status_code == 404, r.text
            assert repository(server.url, "live", "load").status_code == 200
            gone.clear()
            assert close(current(), seen[-1])
            assert time.monotonic() - started < 120
        finally:
            stop.set()
            for c in clients:
                c.result(timeout=60)
    statuses = {(m, s, a) for m, s, a in results}
    bad = [(m, s, a) for m, s, a in results if not (s == 200 or (s == 404 and m == "live" and a))]
    assert not bad, f"{len(bad)} of {len(results)} answers were not 200 (or 404 while unloaded): {statuses}"
    counts = {m: sum(1 for r in results if r[0] == m) for m in ("live", "steady")}
    print(f"reload-under-load: {len(results)} answers {counts}, "
          f"404s while unloaded: {sum(1 for r in results if r[1] == 404)}")  # fmt: skip
    assert counts["live"] >= 50
    assert counts["steady"] >= 20

    # versions 1 and 2 removed, 4 replaced twice, then 3 and 4 unloaded
    wait_until(lambda: unloaded(server, "live") - unloaded_before == 6, timeout=30,
               what="every replaced version drained and freed")  # fmt: skip


# --- memory ---------------------------------------------------------------------------------------------------


def test_unloading_gives_the_memory_back(server: ServerProcess, store: Path, tmp_path: Path) -> None:
    staged = write_big_model(tmp_path / "big")
    pid = server.process.pid
    for _ in range(5):
        scores(server.url, "tiny")
    before = settled_rss(pid)
    shutil.copytree(staged, store / "big")
    assert repository(server.url, "big", "load").status_code == 200
    for _ in range(5):
        scores(server.url, "big")
    loaded = settled_rss(pid)
    assert repository(server.url, "big", "unload").status_code == 200
    wait_until(lambda: unloaded(server, "big") == 1, what="unload")
    after = settled_rss(pid)
    shutil.rmtree(store / "big")
    grown = loaded - before
    print(f"rss: before load {before / 2**20:.1f} MiB, loaded {loaded / 2**20:.1f} MiB, "
          f"after unload {after / 2**20:.1f} MiB")  # fmt: skip
    assert grown > 30 * 2**20, "the big model should show in the RSS"
    assert after <= before * 1.10, f"RSS after unload {after} is not within 10% of {before}"
    assert after - before <= 0.25 * grown, "most of the model's memory should be given back"


# --- the poller -----------------------------------------------------------------------------------------------


def test_poll_store_picks_up_new_and_removed_versions_and_is_off_by_default(
    server: ServerProcess, store: Path, tmp_path: Path
) -> None:
    """Two servers on one store, one polling it: what the poller picks up, the other (this module's server: polling
    is off by default) has still not loaded by then."""
    unpolled = server
    write_version(store / "polled", 1, seed=20)
    load(unpolled.url, "polled")
    with run_server(store, tmp_path, env=ENV, args=["--poll-store-s", "0.2"]) as server:
        first = scores(server.url, "polled", headers={})
        write_version(store / "polled", 2, seed=21)
        wait_until(lambda: not close(scores(server.url, "polled", headers={}), first), timeout=30,
                   what="version 2 served")  # fmt: skip
        assert close(scores(server.url, "polled", 1, headers={}), first)
        assert close(scores(unpolled.url, "polled"), first), "version 2 loaded without polling"
        write_tiny_model(store / ".new", seed=22).rename(store / "added")
        wait_until(lambda: ("added", "1") in index(server.url, {"ready": True}), timeout=30, what="new model loaded")
        r = httpx.post(f"{unpolled.url}/classify", params={"model": "added"}, content=IMAGE, headers=AUTH)
        assert r.status_code == 404, r.text
        assert index(unpolled.url)[("added", "1")]["state"] == "UNAVAILABLE"  # listed, not loaded
        shutil.rmtree(store / "polled" / "2")
        wait_until(lambda: close(scores(server.url, "polled", headers={}), first), timeout=30, what="back to v1")
        shutil.rmtree(store / "added")
        wait_until(lambda: ("added", "1") not in index(server.url), timeout=30, what="removed model unloaded")
        models = httpx.get(f"{server.url}/v1/models").json()["models"]
        # The store's other models are other tests': of this test's, only version 1 of "polled" is left.
        assert [(m["name"], m["versions"]) for m in models if m["name"] in ("polled", "added")] == [("polled", [1])]
