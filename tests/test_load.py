"""A CI-sized load test: closed-loop clients at about four times what the server can take, for a few seconds. Only
200, 503 and 504 may occur, memory stays bounded, and every 200 carries the prediction an idle server gives."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness.launcher import REPO
from harness.load import run_load, sample_images
from tests.profiles import OVERLOAD
from tests.serving import SharedServers, multipart, rss_bytes


def test_overload_answers_only_200_503_504_with_correct_predictions(slow_store: Path, servers: SharedServers) -> None:
    queue = int(OVERLOAD["DEIT_MAX_QUEUE_SIZE"])  # 8, in batches of 4
    images = sample_images(8)
    server = servers.get(slow_store, OVERLOAD)
    reference = []
    for image in images:
        response = httpx.post(f"{server.url}/classify", files=multipart([image]), params={"top_k": "2"})
        first, second = response.json()["results"][0]["predictions"]
        assert first["score"] - second["score"] > 1e-4, "a near tie would make the top-1 check meaningless"
        reference.append((first["label"], first["score"]))
    idle_rss = rss_bytes(server.process.pid)

    report = asyncio.run(
        run_load(server.url, images, concurrency=4 * queue, duration_s=4.0, server_pid=server.process.pid)
    )

    # The load test benchmark's command line, as a user runs it against a running server.
    command = ["--url", server.url, "--concurrency", "2", "--duration", "0.5", "--json"]
    cli = subprocess.run(
        [sys.executable, "-m", "benchmarks.load_test", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    printed = json.loads(cli.stdout)
    assert server.process.poll() is None

    summary = report.summary()
    assert set(report.statuses) <= {200, 503, 504}, summary
    assert report.statuses[200] >= 5, summary
    assert report.statuses[503] > report.statuses[200], f"not overloaded: {summary}"
    assert report.inconsistent_images() == [], summary
    for index, seen in report.top1.items():
        label, score = reference[index]
        assert set(seen) == {label}
        low, high = report.top1_score_range[index]
        assert score == pytest.approx(low, abs=1e-4)
        assert score == pytest.approx(high, abs=1e-4)
    assert len(report.top1) == len(images), "every input was answered at least once"
    peak = report.peak_rss_bytes
    assert peak is not None
    assert peak - idle_rss < 96 * 2**20, (idle_rss / 2**20, peak / 2**20)

    assert set(printed["load"]["statuses"]) == {"200"}
    assert printed["load"]["images_ok"] > 0
    assert printed["load"]["inconsistent_images"] == []
