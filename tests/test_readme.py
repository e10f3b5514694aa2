"""The README's first screen is the product's promise: its two commands must work as written."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.serving import DEMO_MODEL, REPO, free_port, wait_ready

README = (REPO / "README.md").read_text(encoding="utf-8")


def _bash_blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S)]


def _command(block: str) -> list[str]:
    return block.split("#", 1)[0].split()


def test_first_screen_has_exactly_the_serve_and_test_commands() -> None:
    first_screen = README.split("---", 1)[0]
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", first_screen, flags=re.S)]
    assert [_command(b) for b in blocks] == [["scripts/serve"], ["scripts/test"]]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    test_command = " ".join(_command(_bash_blocks()[1]))
    assert re.search(rf"^exec {re.escape(test_command)}\s*$", ci, flags=re.M), ci


def test_serve_command_serves_the_demo_model(tmp_path: Path) -> None:
    """`scripts/serve` with no model flag sets up, loads the embedded model and classifies its samples."""
    command = _command(_bash_blocks()[0])
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen([*command, "--port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, timeout=300)
        for sample in sorted((DEMO_MODEL / "samples").glob("*.png")):
            response = httpx.post(f"{url}/classify", files={"file": (sample.name, sample.read_bytes(), "image/png")})
            assert response.status_code == 200, response.text
            assert response.json()["results"][0]["predictions"][0]["label"] == sample.name.split("_")[0]
        _check_curl_example(url)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()


def _check_curl_example(url: str) -> None:
    """The README's curl output is what the service really answers (scores to 2 decimals across CPUs)."""
    match = re.search(r"\$ curl -s -F file=@(\S+) '[^?]+\?top_k=(\d+)'\n(.*?)\n```", README, flags=re.S)
    assert match, "README lost its curl example"
    sample, top_k, shown_text = REPO / match.group(1), int(match.group(2)), match.group(3)
    shown = json.loads(shown_text)
    response = httpx.post(
        f"{url}/classify", params={"top_k": top_k}, files={"file": (sample.name, sample.read_bytes(), "image/png")}
    )
    live = response.json()
    assert live["model"] == shown["model"]
    live_preds, shown_preds = live["results"][0]["predictions"], shown["results"][0]["predictions"]
    assert [p["label"] for p in live_preds] == [p["label"] for p in shown_preds]
    assert [p["score"] for p in live_preds] == pytest.approx([p["score"] for p in shown_preds], abs=1e-2)


@pytest.mark.slow
def test_test_command_sets_up_and_collects(tmp_path: Path) -> None:
    """`scripts/test` sets up, passes lint and type checks, and finds the suite (collect-only, not recursive)."""
    command = _command(_bash_blocks()[1])
    result = subprocess.run(
        [*command, "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^\d+ tests collected", result.stdout, flags=re.M), result.stdout[-2000:]
