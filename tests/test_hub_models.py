"""Models by Hugging Face hub id: the real ``huggingface_hub`` client against a hub on loopback (``HF_ENDPOINT``),
serving checkpoints written by transformers; then the same start from the cache with the hub gone; and each way a
start-up by id can fail, with one JSON error line, through the start-up ``deit-serve`` runs (in this process: that
such a failure exits the process non-zero with that line alone is checked on a real process in
``test_hardening_store``)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.launcher import free_port
from service.model.hub import HubRef, parse_model_option
from service.settings import Settings
from tests.factories import edit_config_json, hf_model, save_hf
from tests.loopback_hub import LoopbackHub, Repo, read_dir, serve_hub
from tests.serving import (
    FailedStart,
    failed_start,
    image_bytes,
    run_server,
    scrape,
    serve_in_process,
    wait_until,
)

PREPROCESS = {"size": 34, "crop_size": 30, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
KEY = "hub-test-key"


def _repo_files(directory: Path, kind: str, fmt: str = "safetensors", extras: bool = False) -> dict[str, bytes]:
    save_hf(hf_model(kind, seed=len(kind)), directory, fmt)  # type: ignore[arg-type]
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESS))
    files = read_dir(directory)
    if extras:  # what a snapshot of ours must never fetch: code, and a second copy of the weights
        files["modeling_custom.py"] = b"raise SystemExit('remote code must never run')\n"
        files["pytorch_model.bin"] = b"not fetched: safetensors come first"
        files["README.md"] = b"# a model card\n"
    return files


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> LoopbackHub:
    root = tmp_path_factory.mktemp("hub-repos")
    hub = LoopbackHub()
    hub.push("acme/deit-distilled", _repo_files(root / "distilled", "distilled", extras=True))
    hub.push("acme/deit-single", _repo_files(root / "single", "single_head", fmt="bin"))
    hub.push("acme/vit-tiny", _repo_files(root / "vit", "vit"))
    hub.push("acme/deit-bare", _repo_files(root / "bare", "bare"))
    hub.repos["acme/gated"] = Repo(gated=True)
    hub.push("acme/gated", _repo_files(root / "gated", "distilled"))
    hub.repos["acme/cut"] = Repo(cut=True)
    hub.push("acme/cut", _repo_files(root / "cut", "distilled"))
    bert = _repo_files(root / "bert", "distilled")
    edit_config_json(root / "bert", model_type="bert", architectures=["BertModel"])
    hub.push("acme/bert", {**bert, "config.json": (root / "bert" / "config.json").read_bytes()})
    return hub


def _env(hf_home: Path, endpoint: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1", "DEIT_GRPC_PORT": "0"}
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    return env | extra


@contextmanager
def _hub_env(hf_home: Path, endpoint: str | None, offline: bool = False) -> Iterator[None]:
    """This process as ``_env`` sets up a server's: ``huggingface_hub`` reads ``HF_HOME``, ``HF_ENDPOINT`` and
    ``HF_HUB_OFFLINE`` into its constants when first imported (and reads the constants at each call), so they are
    read again here, and again after, from the environment restored."""
    from huggingface_hub import constants

    saved = dict(os.environ)
    for name in [k for k in os.environ if k.startswith(("HF_", "HUGGING"))]:
        del os.environ[name]
    os.environ |= {"HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    if endpoint is not None:
        os.environ["HF_ENDPOINT"] = endpoint
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        importlib.reload(constants)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        importlib.reload(constants)


def _settings(store: Path, *models: str, **values: Any) -> Settings:
    """A start by hub id, without warm-up, as the servers here are started."""
    return Settings.model_validate({"model_store": store, "model": models, "warmup": False, **values})


def _load_by_id(url: str, name: str, hub_id: str) -> httpx.Response:
    """``POST /v2/repository/models/{name}/load`` with the model's hub id, with the key."""
    body = {"parameters": {"hub_id": hub_id}}
    return httpx.post(f"{url}/v2/repository/models/{name}/load", json=body, headers={"X-API-Key": KEY}, timeout=60)


def _models(url: str) -> dict[str, dict[str, Any]]:
    body = httpx.get(f"{url}/v1/models", headers={"X-API-Key": KEY}, timeout=10).json()
    return {m["name"]: m for m in body["models"]}


def _info_hub_ids(url: str, model: str) -> list[str]:
    """The hub ids of the ``deit_model_info`` series of ``model``, one per series."""
    page = scrape(url)
    samples = page.families.get("deit_model_info", [])
    return sorted(
        labels["hub_id"] for name, labels, _ in samples if name == "deit_model_info" and labels["model"] == model
    )


MODELS = ["acme/deit-distilled", "single=acme/deit-single@main", "acme/vit-tiny", "bare=acme/deit-bare"]


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-home")


def test_hub_ids_and_a_store_entry_download_pin_and_then_serve_offline(
    hub: LoopbackHub, hf_home: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "vit.hub").write_text("# served by hub id\nacme/vit-tiny@main\n")  # a store entry naming a hub model
    args = [a for m in MODELS for a in ("--model", m)]
    commits = {name: repo.commits[-1][0] for name, repo in hub.repos.items()}
    with serve_hub(hub) as endpoint:
        env = _env(hf_home, endpoint) | {"DEIT_API_KEYS": KEY, "DEIT_ALLOW_HUB_IDS": "true", "DEIT_WARMUP": "false"}
        with run_server(store, tmp_path, env=env, args=args) as server:
            models = _models(server.url)
            assert sorted(models) == ["bare", "deit-distilled", "single", "vit", "vit-tiny"]
            assert models["deit-distilled"]["default"]  # the first --model answers requests that name none
            assert models["deit-distilled"]["hub_id"] == "acme/deit-distilled"
            assert models["deit-distilled"]["revision"] == commits["acme/deit-distilled"]
            assert models["single"]["revision"] == commits["acme/deit-single"]
            assert models["bare"]["tasks"] == ["embed"]
            entry = httpx.get(f"{server.url}/v1/models/vit", headers={"X-API-Key": KEY}, timeout=10).json()
            assert (entry["hub_id"], entry["revision"]) == ("acme/vit-tiny", commits["acme/vit-tiny"])
            assert models["vit-tiny"]["num_labels"] == models["single"]["num_labels"] == 5
            meta = httpx.get(f"{server.url}/v2/models/single", headers={"X-API-Key": KEY}, timeout=10).json()
            assert (meta["hub_id"], meta["revision"]) == ("acme/deit-single", commits["acme/deit-single"])
            page = scrape(server)
            info = {"model": "vit-tiny", "hub_id": "acme/vit-tiny", "revision": commits["acme/vit-tiny"]}
            assert page.value("deit_model_info", **info) == 1
            files = {"file": ("red.png", image_bytes(), "image/png")}
            answer = httpx.post(f"{server.url}/classify", files=files, headers={"X-API-Key": KEY}, timeout=30)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == "deit-distilled"
            # Only configs and the first weight format were fetched: never code, never a second copy of the weights.
            snapshot = hf_home / "hub" / "models--acme--deit-distilled" / "snapshots" / commits["acme/deit-distilled"]
            assert sorted(p.name for p in snapshot.iterdir()) == [
                "config.json",
                "model.safetensors",
                "preprocessor_config.json",
            ]
            assert not any("modeling_custom.py" in r or "README" in r for r in hub.requests)

            # A new commit on the hub does not move a running process: a reload serves the pinned commit.
            new_commit = hub.push("acme/deit-single", hub.repos["acme/deit-single"].commits[-1][1])
            reload = httpx.post(
                f"{server.url}/v2/repository/models/single/load", headers={"X-API-Key": KEY}, timeout=60
            )
            assert reload.status_code == 200, reload.text
            assert _models(server.url)["single"]["revision"] == commits["acme/deit-single"] != new_commit

            # With --allow-hub-ids and a key, the repository API loads a model by id at run time.
            load = _load_by_id(server.url, "late", "acme/vit-tiny")
            assert load.status_code == 200, load.text
            assert _models(server.url)["late"]["hub_id"] == "acme/vit-tiny"
            # Loading another id under the name replaces it, and its info series with it once the old one retired.
            replace = _load_by_id(server.url, "late", "acme/deit-bare")
            assert replace.status_code == 200, replace.text
            assert _models(server.url)["late"]["hub_id"] == "acme/deit-bare"
            wait_until(
                lambda: _info_hub_ids(server.url, "late") == ["acme/deit-bare"],
                timeout=30,
                what="one deit_model_info series for 'late'",
                every=0.25,
            )
            # A failed load by id is a 400 naming the problem; what served still serves, nothing is added.
            broken = _load_by_id(server.url, "late", "acme/bert")
            assert broken.status_code == 400
            assert "not a DeiT/ViT image model" in broken.json()["error"]
            assert _models(server.url)["late"]["hub_id"] == "acme/deit-bare"
            refused = httpx.post(
                f"{server.url}/v2/repository/models/late/load", json={"parameters": {"hub_id": "acme/vit-tiny"}}
            )
            assert refused.status_code == 401
    # The hub is gone. Offline (on a real process), and then merely unreachable (the same start-up in this process),
    # the same start serves the same commits from the cache.
    env = _env(hf_home, endpoint, HF_HUB_OFFLINE="1") | {"DEIT_API_KEYS": KEY, "DEIT_WARMUP": "false"}
    with run_server(store, tmp_path, env=env, args=args) as server:
        _serves_the_pinned_commits_from_the_cache(server.url, commits)
    settings = _settings(store, *MODELS, api_keys=(KEY,), port=free_port())
    with _hub_env(hf_home, endpoint), serve_in_process(settings) as in_process:
        _serves_the_pinned_commits_from_the_cache(in_process.url, commits)


def _serves_the_pinned_commits_from_the_cache(url: str, commits: dict[str, str]) -> None:
    """What a start of ``MODELS`` (and the store's ``vit.hub``), with a key and without --allow-hub-ids, serves once
    the hub is out of reach."""
    models = _models(url)
    assert {n: m["revision"] for n, m in models.items()} == {
        "deit-distilled": commits["acme/deit-distilled"],
        "single": commits["acme/deit-single"],
        "vit-tiny": commits["acme/vit-tiny"],
        "vit": commits["acme/vit-tiny"],
        "bare": commits["acme/deit-bare"],
    }
    files = {"file": ("red.png", image_bytes(), "image/png")}
    answer = httpx.post(f"{url}/classify?model=single", files=files, headers={"X-API-Key": KEY})
    assert answer.status_code == 200, answer.text
    # Without --allow-hub-ids no client makes the server download, key or not.
    refused = _load_by_id(url, "other", "acme/vit-tiny")
    assert refused.status_code == 403
    assert "--allow-hub-ids" in refused.json()["error"]
    # The load request's body is bounded and checked like every other.
    load_url = f"{url}/v2/repository/models/other/load"
    huge = httpx.post(load_url, content=b"{" + b" " * 70_000 + b"}", headers={"X-API-Key": KEY})
    assert huge.status_code == 413
    malformed = httpx.post(load_url, content=b'{"parameters": 3}', headers={"X-API-Key": KEY})
    assert malformed.status_code == 422
    assert "parameters" in malformed.json()["error"]


def _hub_error(failed: FailedStart) -> dict[str, Any]:
    """The one error line of a start by hub id that failed: a load failure, with no traceback beside its message."""
    assert failed.record["code"] == "model_load_failed", failed.line
    assert "exception" not in failed.record, failed.line
    return failed.record


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("acme/nope", "no such model repository"),
        ("acme/gated", "is gated"),
        ("acme/bert", "not a DeiT/ViT image model"),
        ("acme/cut", "nothing of it is served"),
        ("acme/deit-distilled@v9", "has no revision 'v9'"),
    ],
)
def test_a_start_by_hub_id_that_cannot_serve_fails_with_one_error(
    hub: LoopbackHub, tmp_path: Path, model: str, needle: str
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with serve_hub(hub) as endpoint, _hub_env(tmp_path / "hf", endpoint):
        error = _hub_error(failed_start(_settings(store, model)))
    assert needle in error["message"], error
    assert "force_download" not in error["message"]  # the start resumes a cut download; it never forces one
    assert error["repo_id"] == model.split("@")[0]
    assert error["code"] == "model_load_failed"
    snapshots = tmp_path / "hf" / "hub" / f"models--{model.split('@')[0].replace('/', '--')}" / "snapshots"
    weights = list(snapshots.rglob("*.safetensors")) if snapshots.exists() else []
    assert weights == []  # nothing half-downloaded is left where it could be served


def test_offline_without_the_model_cached_names_the_cache_and_the_command(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with _hub_env(tmp_path / "hf", None, offline=True):
        error = _hub_error(failed_start(_settings(store, "facebook/deit-base-distilled-patch16-224")))
    assert error["repo_id"] == "facebook/deit-base-distilled-patch16-224"
    assert error["cache"] == str(tmp_path / "hf" / "hub")
    assert error["command"] == "deit-serve --download-only --model facebook/deit-base-distilled-patch16-224"
    assert error["cache"] in error["message"]
    assert error["command"] in error["message"]


def test_an_unreachable_hub_without_the_model_cached_fails_with_its_notes_in_the_log_only(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreachable hub is named at once (no retries of the client's first), and the hub client's own notes are
    records of the service's log, which writes JSON lines: its stderr handler, added when it is first imported, is
    gone, and nothing is written raw to stderr."""
    store = tmp_path / "store"
    store.mkdir()
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    hub_log = logging.getLogger("huggingface_hub")
    monkeypatch.setattr(hub_log, "handlers", [logging.StreamHandler()])  # as the client's first import leaves it
    capfd.readouterr()
    with _hub_env(tmp_path / "hf", closed):
        error = _hub_error(failed_start(_settings(store, "acme/deit-distilled")))
    assert error["repo_id"] == "acme/deit-distilled"
    assert "the hub is unreachable" in error["message"]
    assert not [r for r in caplog.records if r.getMessage().startswith("Retrying in")]
    assert (hub_log.handlers, hub_log.propagate) == ([], True)
    logging.getLogger("huggingface_hub.utils._http").warning("a note of the hub client")  # as its retries log
    assert "a note of the hub client" in [r.getMessage() for r in caplog.records]  # passed on to the service's log
    assert capfd.readouterr().err == ""


def test_a_hub_that_never_answers_is_given_up_within_the_metadata_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub whose connection opens but that never answers (a stalled proxy) is bounded by the client's metadata
    timeout (``HF_HUB_ETAG_TIMEOUT``), then the start falls back to the cache, which names what to do."""
    from huggingface_hub import constants

    store = tmp_path / "store"
    store.mkdir()
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel completes the handshake; nothing answers
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with _hub_env(tmp_path / "hf", endpoint):
            monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
            started = time.monotonic()
            error = _hub_error(failed_start(_settings(store, "acme/deit-distilled")))
            elapsed = time.monotonic() - started
    assert "the hub is unreachable" in error["message"]
    assert "Timeout" in error["message"]
    assert elapsed < 15, elapsed  # one timed-out request, not the client's retries nor the OS connect timeout


def test_download_only_fills_the_cache_for_an_offline_start(hub: LoopbackHub, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with serve_hub(hub) as endpoint:
        done = subprocess.run(
            [sys.executable, "-m", "service", "--download-only", "--model", "acme/vit-tiny"],
            env=_env(tmp_path / "hf", endpoint) | {"DEIT_MODEL_STORE": str(store)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["revision"] == hub.repos["acme/vit-tiny"].commits[-1][0]
    assert (Path(line["path"]) / "model.safetensors").is_file()


def test_without_the_hub_extra_a_hub_id_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interpreter where ``import huggingface_hub`` fails, as in an install without the extra."""
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # None there: its import raises ImportError
    error = _hub_error(failed_start(_settings(store, "acme/deit-distilled")))
    assert "pip install 'deit-serve[hub]'" in error["message"]


def test_model_options_parse_names_ids_and_revisions() -> None:
    assert parse_model_option("facebook/deit-base-distilled-patch16-224") == (
        "deit-base-distilled-patch16-224",
        HubRef("facebook/deit-base-distilled-patch16-224"),
    )
    assert parse_model_option("base=facebook/deit-base-patch16-224@abc123") == (
        "base",
        HubRef("facebook/deit-base-patch16-224", "abc123"),
    )
    for bad in ("", "a/b/c", "../x", "x@", "n a=me/x", "-x=me/x"):
        with pytest.raises(ValueError, match=r"not a|no revision"):
            parse_model_option(bad)
