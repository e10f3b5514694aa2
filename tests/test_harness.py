"""Tests and benchmarks share one launcher and never import each other; the launcher counts what it starts."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from harness.launcher import SPAWN_LOG, free_port, running, service_env
from tests.serving import REPO
from tests.test_layers import imports_of

FORBIDDEN = {"tests": {"benchmarks"}, "benchmarks": {"tests"}, "harness": {"tests", "benchmarks"}}


@pytest.mark.parametrize("package", ["tests", "benchmarks", "harness"])
def test_tests_and_benchmarks_never_import_each_other(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, package
    offenders = {
        f"{path.relative_to(REPO)}: {name}"
        for path in files
        for name in imports_of(path, REPO)
        if name.split(".")[0] in FORBIDDEN[package]
    }
    assert not offenders


def test_every_start_is_counted_in_the_spawn_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spawns = tmp_path / "spawns"
    monkeypatch.setenv(SPAWN_LOG, str(spawns))
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    env = service_env(port, env={"DEIT_MAX_FILES": "3"})
    with running(argv, port=port, log_path=tmp_path / "server.log", env=env, ready_path="/") as server:
        assert httpx.get(server.url).status_code == 200  # ready means answering
    assert server.process.returncode is not None, "stopped on leaving"
    [line] = spawns.read_text().splitlines()
    started_by, pid, command, settings = line.split("\t")
    assert started_by == "tests/test_harness.py::test_every_start_is_counted_in_the_spawn_log"
    assert int(pid) == server.pid
    assert command == " ".join(argv)
    assert settings == f"DEIT_HOST=127.0.0.1 DEIT_MAX_FILES=3 DEIT_PORT={port}"
