"""The service as deployed: ``deit-serve`` / ``python -m service`` as a real uvicorn process on a free port."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.cli import main
from service.settings import DEFAULT_MODEL_STORE, Settings
from tests.serving import (
    DEMO_MODEL,
    Scrape,
    ServerProcess,
    SharedServers,
    failed_start,
    noise_image_bytes,
    run_default_server,
    scrape,
    write_tiny_model,
)

MAX_BATCH = 8
UPLOAD_LIMIT = 256 * 1024

Json = dict[str, Any]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model at 128×128 (1,026 tokens): each forward pass takes long enough for concurrent requests to queue
    behind it, as they do behind a real model, so batching is observable on fast machines too."""
    store = tmp_path_factory.mktemp("store")
    write_tiny_model(store / "tiny", image_size=128)
    return store


@pytest.fixture(scope="module")
def server(store: Path, servers: SharedServers) -> ServerProcess:
    env = {
        "DEIT_DEVICE": "cpu",
        "DEIT_DTYPE": "float32",
        "DEIT_MAX_BATCH_SIZE": str(MAX_BATCH),
        "DEIT_MAX_BATCH_DELAY_MS": "20",
        "DEIT_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
    }
    return servers.get(store, env)


def _files(*images: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (name, data, "image/png")) for name, data in images]


def _ranking(result: Json) -> tuple[list[int], list[float]]:
    return [p["index"] for p in result["predictions"]], [p["score"] for p in result["predictions"]]


def _batch_delta(before: Scrape, after: Scrape, sample: str, **labels: str) -> float:
    return after.value(sample, model="tiny", **labels) - before.value(sample, model="tiny", **labels)


# --- the embedded demo model, with no settings at all ---------------------------------------------------------


def test_deit_serve_with_no_arguments_classifies_the_demo_samples(tmp_path: Path) -> None:
    """The promise of the README: `deit-serve` alone loads the embedded model and answers truthfully."""
    samples = sorted((DEMO_MODEL / "samples").glob("*.png"))
    assert samples, f"the embedded demo model has no samples in {DEMO_MODEL / 'samples'}"
    with run_default_server(tmp_path, wait=False) as server:
        seen: list[tuple[int | str, int | str]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not seen or seen[-1][0] != 200):
            assert server.process.poll() is None, server.log()
            statuses: list[int | str] = []
            for path in ("/readyz", "/healthz"):
                try:
                    statuses.append(httpx.get(server.url + path, timeout=5).status_code)
                except httpx.ConnectError:
                    statuses.append("refused")
            seen.append((statuses[0], statuses[1]))
            time.sleep(0.05)
        assert seen[-1][0] == 200, server.log()
        # Until ready: refused or 503; once the socket answers, liveness is 200.
        assert {ready for ready, _ in seen[:-1]} <= {"refused", 503}, seen
        assert {alive for ready, alive in seen if ready != "refused"} <= {200}, seen

        models = httpx.get(f"{server.url}/v1/models").json()["models"]
        assert [m["name"] for m in models if m["default"]] == [DEMO_MODEL.name]
        # With no store setting, the store is the one packaged with the service, whatever the working directory.
        loaded = [r["source"] for r in server.log_records() if r.get("message") == "model loaded"]
        assert loaded == [str(DEFAULT_MODEL_STORE / DEMO_MODEL.name)], loaded
        response = httpx.post(
            f"{server.url}/classify", files=_files(*((p.name, p.read_bytes()) for p in samples)), timeout=60
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == DEMO_MODEL.name
        assert [r["filename"] for r in body["results"]] == [p.name for p in samples]
        wrong = {
            r["filename"]: r["predictions"][0]["label"]
            for r in body["results"]
            if r["predictions"][0]["label"] != r["filename"][0]
        }
        assert not wrong, f"misclassified samples (file → top-1 label): {wrong}"


# --- batching across requests ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_requests_share_forward_passes(server: ServerProcess) -> None:
    images = [(f"img-{seed}.png", noise_image_bytes(seed)) for seed in range(5)]
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
        alone = {}
        for name, data in images:
            response = await client.post("/classify", params={"top_k": 10}, files=_files((name, data)))
            assert response.status_code == 200, response.text
            alone[name] = _ranking(response.json()["results"][0])
        before = Scrape.parse((await client.get("/metrics")).text)
        burst = [images[i % len(images)] for i in range(40)]
        responses = await asyncio.gather(
            *(client.post("/classify", params={"top_k": 10}, files=_files(image)) for image in burst)
        )
        after = Scrape.parse((await client.get("/metrics")).text)

    for (name, _), response in zip(burst, responses, strict=True):
        assert response.status_code == 200, response.text
        [result] = response.json()["results"]
        assert result["filename"] == name
        indices, scores = _ranking(result)
        assert indices == alone[name][0]
        assert scores == pytest.approx(alone[name][1], abs=1e-5)
    images_run = _batch_delta(before, after, "deit_batch_size_sum")
    batches = _batch_delta(before, after, "deit_batch_size_count")
    single = _batch_delta(before, after, "deit_batch_size_bucket", le="1.0")
    assert images_run == len(burst)
    assert batches < len(burst), f"{batches} forward passes for {len(burst)} concurrent images: nothing was batched"
    assert single < batches, "every forward pass held a single image"
    assert _batch_delta(before, after, "deit_batch_size_bucket", le=f"{float(MAX_BATCH)}") == batches


def test_a_request_larger_than_the_batch_is_split_and_fully_answered(server: ServerProcess) -> None:
    images = [(f"{i:02d}.png", noise_image_bytes(200 + i)) for i in range(2 * MAX_BATCH + 3)]
    before = scrape(server)
    response = httpx.post(f"{server.url}/classify", files=_files(*images), timeout=60)
    after = scrape(server)
    assert response.status_code == 200, response.text
    assert [r["filename"] for r in response.json()["results"]] == [name for name, _ in images]
    assert all(len(r["predictions"]) == 5 for r in response.json()["results"])  # the default top_k
    assert _batch_delta(before, after, "deit_batch_size_sum") == len(images)
    batches = _batch_delta(before, after, "deit_batch_size_count")
    assert batches >= 3
    assert _batch_delta(before, after, "deit_batch_size_bucket", le=f"{float(MAX_BATCH)}") == batches


# --- errors over a real connection ----------------------------------------------------------------------------


def test_errors_over_http_leave_the_server_serving(server: ServerProcess) -> None:
    large = noise_image_bytes(7, size=(400, 400))
    assert len(large) > UPLOAD_LIMIT
    png = noise_image_bytes(8)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        cases = [
            (client.post("/classify", files=_files(("big.png", large))), 413, "payload_too_large"),
            (client.post("/classify", content=b"hi", headers={"Content-Type": "text/plain"}), 415,
             "unsupported_media_type"),
            (client.post("/classify", files=_files(("a.txt", b"words"))), 415, "unsupported_media_type"),
            (client.post("/classify", files=_files(("cut.png", png[:100]))), 422, "invalid_image"),
            (client.post("/classify", files=_files(("e.png", b""))), 422, "empty_upload"),
            (client.post("/classify", params={"model": "nope"}, files=_files(("a.png", png))), 404,
             "model_not_found"),
            (client.get("/no/such/path"), 404, "not_found"),
        ]  # fmt: skip
        for response, status, code in cases:
            assert response.status_code == status, response.text
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"]["code"] == code
            assert response.json()["error"]["message"]
        ok = client.post("/classify", files=_files(("after.png", png)))
        assert ok.status_code == 200, ok.text
        assert ok.json()["results"][0]["filename"] == "after.png"
    assert server.process.poll() is None


# --- the command line -----------------------------------------------------------------------------------------


def test_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: deit-serve")
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in out, name
        assert f"DEIT_{name.upper()}" in re.sub(r"\s+", "", out), name


@pytest.mark.parametrize(
    ("env", "argv", "message"),
    [
        pytest.param({"DEIT_MAX_BATCH_SIZE": "0"}, [], "max_batch_size", id="env"),
        pytest.param({}, ["--max-batch-size", "0"], "max_batch_size", id="flag"),
        pytest.param({"DEIT_MODEL_STORE": "/nonexistent/store"}, [], "is not a directory", id="store"),
        pytest.param({}, ["--request-timeout-s", "500"], "request_timeout_s", id="cross-field"),
    ],
)
def test_invalid_settings_exit_non_zero_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    argv: list[str],
    message: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("deit-serve: invalid setting"), err
    assert message in err


def test_a_store_that_cannot_load_fails_start_up_with_one_error_naming_it(tmp_path: Path) -> None:
    """The start-up ``deit-serve`` runs, in this process: the load fails, the service never becomes ready, and one
    JSON error line says why (that such a failure exits the process non-zero with that line alone is checked on a
    real process in ``test_hardening_store``)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    write_tiny_model(broken / "tiny")
    (broken / "tiny" / "config.json").write_text("{not json")
    expected = {empty: "holds no models", broken: "config.json: not valid JSON"}
    for store, message in expected.items():
        failed = failed_start(Settings.model_validate({"model_store": store}))
        assert message in failed.record["message"], failed.line
        assert "Traceback" not in failed.line, failed.line
