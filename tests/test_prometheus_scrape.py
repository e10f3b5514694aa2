"""A real Prometheus server scrapes a real ``deit-serve`` process: the exposition format is what Prometheus reads."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.profiles import KEYED_AUTH, keyed_server
from tests.serving import ServerProcess, SharedServers, free_port, noise_image_bytes, scrape, stop_process

SCRAPE_TIMEOUT_S = 30.0


@pytest.fixture
def prometheus_binary() -> str:
    """The ``prometheus`` executable; CI installs it (scripts/test), so there its absence is a failure."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("the prometheus binary is not installed; scripts/test installs Debian's 'prometheus'")
        pytest.skip("the prometheus binary is not installed (apt-get install prometheus)")
    return binary


@pytest.fixture
def server(tiny_store: Path, servers: SharedServers) -> ServerProcess:
    """The tiny model in float32 with /metrics open (``KEYED``, shared: its counters are read as deltas)."""
    return keyed_server(servers, tiny_store)


@pytest.fixture
def prometheus(prometheus_binary: str, server: ServerProcess, tmp_path: Path) -> Iterator[str]:
    """A Prometheus scraping ``server`` every second; yields its base URL."""
    target = server.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: deit-serve\n"
        "    scrape_interval: 1s\n"
        "    scrape_timeout: 1s\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                prometheus_binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process, timeout=10)
        if process.returncode not in (0, -15):
            pytest.fail(f"prometheus exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")


def _query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    """The instant vector of ``promql``; empty while Prometheus is starting or has not scraped yet."""
    try:
        response = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5)
    except httpx.TransportError:
        return []
    if response.status_code != 200:
        return []
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _values(series: list[dict[str, Any]], **labels: str) -> list[float]:
    return [float(s["value"][1]) for s in series if s["metric"].items() >= labels.items()]


def test_prometheus_scrapes_the_request_counters(server: ServerProcess, prometheus: str) -> None:
    sent = 3
    # The server is shared: Prometheus must read what the server's own /metrics said before, plus what is sent here.
    before = scrape(server)
    ok_before = before.value("deit_requests_total", endpoint="/classify", model="tiny", status="200")
    missing_before = before.value("deit_requests_total", endpoint="/classify", status="404")
    images_before = before.value("deit_images_total", model="tiny")
    png = [("file", ("a.png", noise_image_bytes(0), "image/png"))]
    missing = httpx.post(f"{server.url}/classify", params={"model": "nope"}, files=png, headers=KEYED_AUTH)
    assert missing.status_code == 404
    for seed in range(sent):
        files = [("file", (f"{seed}.png", noise_image_bytes(seed), "image/png"))]
        assert httpx.post(f"{server.url}/classify", files=files, headers=KEYED_AUTH, timeout=30).status_code == 200

    classify = {"endpoint": "/classify", "job": "deit-serve", "__name__": "deit_requests_total"}
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    series: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        series = _query(prometheus, "deit_requests_total")
        if _values(series, model="tiny", status="200", **classify) == [ok_before + sent]:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"Prometheus did not report {sent} classify requests within {SCRAPE_TIMEOUT_S}s; last: {series}")

    # The 404 went first, so the scrape that saw the last 200 saw it too.
    assert sum(_values(series, status="404", **classify)) == missing_before + 1
    [up] = _query(prometheus, 'up{job="deit-serve"}')
    assert float(up["value"][1]) == 1.0
    assert _values(_query(prometheus, 'deit_images_total{model="tiny"}')) == [images_before + sent]
    assert _values(_query(prometheus, 'deit_model_info{model="tiny", dtype="float32"}')) == [1.0]
