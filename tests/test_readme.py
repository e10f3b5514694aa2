"""The README's first screen is the product's promise: its two commands must work as written."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.launcher import running, service_env
from service.api.schemas import ModelInfo
from service.cli import parse_command
from tests.serving import DEMO_MODEL, REPO, free_port

README = (REPO / "README.md").read_text(encoding="utf-8")


def _bash_blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S)]


def _command(block: str) -> list[str]:
    return block.split("#", 1)[0].split()


def test_first_screen_has_exactly_the_serve_and_test_commands() -> None:
    first_screen = README.split("---", 1)[0]
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", first_screen, flags=re.S)]
    assert [_command(b) for b in blocks] == [["scripts/serve"], ["scripts/test"]]


def test_try_it_starts_with_a_hub_id_the_page_and_the_python_clients() -> None:
    try_it = README.split("---", 1)[1].split("\n## ", 2)[1]
    assert "$ scripts/serve --model facebook/deit-base-distilled-patch16-224" in try_it.split("```python")[0]
    assert "](docs/ui.png)" in try_it
    assert (REPO / "docs" / "ui.png").is_file()
    python = try_it.split("```python", 1)[1]
    assert "tritonclient" in python
    assert "InferenceClient" in python


def test_every_serve_command_of_the_readme_is_a_valid_command_line() -> None:
    """The ``scripts/serve …`` and ``deit-serve …`` lines of the README's examples parse into settings."""
    lines = re.findall(r"^\$ (?:[A-Z_]+=\S+ )*(?:scripts/serve|deit-serve)(.*)$", README, flags=re.M)
    assert len(lines) >= 3, lines
    for args in lines:
        _, fetch_only = parse_command(shlex.split(args))
        assert fetch_only == ("--download-only" in args)


def test_download_only_is_read_from_the_parsed_command_line_alone() -> None:
    """``--download-only`` is a flag of the one parser: accepted wherever argparse accepts it (an unambiguous
    abbreviation too), never mistaken for another flag's value."""
    assert parse_command(["--download", "--model", "acme/deit"])[1] is True
    assert parse_command(["--model", "acme/deit", "--download-only"])[1] is True
    settings, fetch_only = parse_command(["--model", "acme/deit"])
    assert fetch_only is False
    assert settings.model == ("acme/deit",)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    test_command = " ".join(_command(_bash_blocks()[1]))
    assert re.search(rf"^exec {re.escape(test_command)}\s*$", ci, flags=re.M), ci


def _configuration_table_flags() -> list[str]:
    """The flags named in the first column of the README's Configuration table, in order."""
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "README lost its Configuration table"
    return [flag for row in rows for flag in re.findall(r"`(--[a-z0-9-]+)`", row.split("|")[1])]


def test_configuration_table_lists_every_flag_of_the_help() -> None:
    """Each flag `deit-serve --help` shows has a row in the README table, and the table names no flag that is gone."""
    result = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, timeout=120, check=True
    )
    options = result.stdout.split("options:", 1)[1]
    help_flags = {m for m in re.findall(r"^  (--[a-z0-9-]+)", options, flags=re.M) if m != "--help"}
    assert len(help_flags) > 20, result.stdout
    in_table = _configuration_table_flags()
    assert len(in_table) == len(set(in_table)), f"flags listed twice: {in_table}"
    assert sorted(help_flags - set(in_table)) == [], "flags missing from README's Configuration table"
    assert sorted(set(in_table) - help_flags) == [], "README's Configuration table names flags deit-serve lacks"


def _models_example() -> list[dict[str, Any]]:
    """The models listed in the README's `/v1/models` example output."""
    match = re.search(r"\$ curl -s http://127\.0\.0\.1:8000/v1/models\n\s*(\{.*?\})\n", README)
    assert match, "README lost its /v1/models example"
    models: list[dict[str, Any]] = json.loads(match.group(1))["models"]
    return models


def test_models_example_has_exactly_the_fields_of_the_response_schema() -> None:
    (shown,) = _models_example()
    assert list(shown) == list(ModelInfo.model_fields)


def test_serve_command_serves_the_demo_model_from_the_repository_model_store(tmp_path: Path) -> None:
    """`scripts/serve` with no model flag sets up, serves model_store/ (the demo model by its link) and classifies
    the demo's samples."""
    command = _command(_bash_blocks()[0])
    port = free_port()
    with running(
        [*command, "--port", str(port)], port=port, log_path=tmp_path / "serve.log", env=service_env(port), cwd=REPO,
        ready_timeout=300, stop_timeout=60,
    ) as server:  # fmt: skip
        url = server.url
        loaded = [r for r in server.log_records() if r.get("message") == "model loaded"]
        assert [r["source"] for r in loaded] == [str(REPO / "model_store" / DEMO_MODEL.name)], loaded
        for sample in sorted((DEMO_MODEL / "samples").glob("*.png")):
            response = httpx.post(f"{url}/classify", files={"file": (sample.name, sample.read_bytes(), "image/png")})
            assert response.status_code == 200, response.text
            assert response.json()["results"][0]["predictions"][0]["label"] == sample.name.split("_")[0]
        _check_curl_example(url)
        _check_models_example(url)
    assert server.process.returncode == 0, server.log()


def test_the_repository_model_store_tracks_only_its_readme_and_the_demo_link() -> None:
    """model_store/ is where a user's checkpoints go: git ignores them, the demo model is a link to the packaged one."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    store = REPO / "model_store"
    assert (store / DEMO_MODEL.name).resolve() == DEMO_MODEL.resolve()
    assert "scripts/serve" in (store / "README.md").read_text()
    names = ["README.md", ".gitignore", DEMO_MODEL.name, "my-model/config.json", "deit-small.pth"]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *(f"model_store/{n}" for n in names)],
        cwd=REPO, capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    assert ignored == ["model_store/my-model/config.json", "model_store/deit-small.pth"]


def _check_curl_example(url: str) -> None:
    """The README's curl output is what the service really answers (scores to 2 decimals across CPUs and dtypes).

    Classes whose scores lie within that tolerance of each other may come in either order (a near tie that
    float32 and bfloat16 break differently); every other pair keeps the order shown.
    """
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
    live_scores = {p["label"]: p["score"] for p in live_preds}
    shown_scores = {p["label"]: p["score"] for p in shown_preds}
    assert sorted(live_scores) == sorted(shown_scores)
    assert live_scores == pytest.approx(shown_scores, abs=1e-2)
    rank = {label: i for i, label in enumerate(live_scores)}
    for i, first in enumerate(shown_preds):
        for second in shown_preds[i + 1 :]:
            if first["score"] - second["score"] > 1e-2:
                assert rank[first["label"]] < rank[second["label"]], (first, second, live_preds)


def _check_models_example(url: str) -> None:
    """The README's /v1/models output is what the service answers, except dtype, device and the runtime's precision
    (machine-dependent)."""
    live: list[dict[str, Any]] = httpx.get(f"{url}/v1/models").json()["models"]
    machine_dependent = {"dtype", "device"}

    def portable(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept = [{k: v for k, v in m.items() if k not in machine_dependent} for m in models]
        return [{**m, "runtime": {k: v for k, v in m["runtime"].items() if k != "precision"}} for m in kept]

    assert portable(live) == portable(_models_example())


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
