"""One way to start a server under test or benchmark, wait until it is ready, and stop it.

Every start goes through ``launch``. When ``HARNESS_SPAWN_LOG`` names a file, each start appends one line to it
(the test that started it, the process id, the command), so a whole run's server starts can be counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
SPAWN_LOG = "HARNESS_SPAWN_LOG"


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def service_argv(*args: str) -> list[str]:
    """``python -m service`` with this interpreter."""
    return [sys.executable, "-m", "service", *args]


def service_env(port: int, store: Path | None = None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its ``DEIT_*`` settings, listening on ``127.0.0.1:port``, plus ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("DEIT_")}
    full.update({"DEIT_HOST": "127.0.0.1", "DEIT_PORT": str(port)})
    if store is not None:
        full["DEIT_MODEL_STORE"] = str(store)
    full.update(env or {})
    return full


@dataclass
class ServerProcess:
    """A started server process; ``url`` is its base URL, its stdout and stderr go to ``log_path``."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    group: bool = False  # started in a process group of its own, stopped as a whole

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, object]]:
        """The JSON lines of the log (the service logs one JSON object a line)."""
        records = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
        return records

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> None:
        stop(self.process, timeout, group=self.group)


def launch(
    argv: Sequence[str],
    *,
    port: int,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path | str | None = None,
    group: bool = False,
) -> ServerProcess:
    """Start ``argv`` (a server that will listen on ``port``) and return at once; the caller stops it."""
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            list(argv), env=dict(env), cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=group
        )
    _count(process.pid, argv, env)
    return ServerProcess(process, f"http://127.0.0.1:{port}", log_path, dict(env), group)


def _count(pid: int, argv: Sequence[str], env: Mapping[str, str]) -> None:
    record = os.environ.get(SPAWN_LOG)
    if record:
        started_by = os.environ.get("PYTEST_CURRENT_TEST", "-").rsplit(" ", 1)[0]
        settings = " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("DEIT_"))
        with open(record, "a") as spawns:
            spawns.write(f"{started_by}\t{pid}\t{' '.join(argv)}\t{settings}\n")


def wait_ready(
    url: str,
    process: subprocess.Popen[bytes] | None = None,
    timeout: float = 120.0,
    path: str = "/readyz",
    alive: Callable[[], bool] | None = None,
    every: float = 0.05,
) -> None:
    """Poll ``url + path`` every ``every`` seconds until it answers 200; an error as soon as ``process`` exits (or
    ``alive``, for a server that is not our child such as a container, says it is gone), TimeoutError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        if alive is not None and not alive():
            raise RuntimeError("the server stopped before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}{path} did not answer 200 within {timeout}s")
        time.sleep(every)


def stop(process: subprocess.Popen[bytes], timeout: float = 30.0, group: bool = False) -> None:
    """SIGTERM (to its whole process group with ``group``), then SIGKILL if it has not exited within ``timeout``."""

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(process.pid, sig)
            elif process.poll() is None:
                process.send_signal(sig)

    if process.poll() is None or group:
        send(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
        if group or process.poll() is None:
            send(signal.SIGKILL)  # a group's workers (LitServe's) may outlive its leader
    process.wait()


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    *,
    port: int,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path | str | None = None,
    group: bool = False,
    ready_path: str | None = "/readyz",
    ready_timeout: float = 120.0,
    stop_timeout: float = 30.0,
) -> Iterator[ServerProcess]:
    """``launch``, then wait until ``ready_path`` answers 200 (not at all when None); always stopped afterwards."""
    server = launch(argv, port=port, log_path=log_path, env=env, cwd=cwd, group=group)
    try:
        if ready_path is not None:
            try:
                wait_ready(server.url, server.process, ready_timeout, ready_path)
            except (RuntimeError, TimeoutError) as e:
                raise type(e)(f"{e}; log: {log_path}") from e
        yield server
    finally:
        server.stop(stop_timeout)
