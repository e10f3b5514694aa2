"""Closed-loop HTTP load and server processes for the end-to-end benchmark.

``concurrency`` clients each send one request, wait for its answer and send the next. Each client has its own
connection (one ``httpx.AsyncClient`` with a single connection: a pool shared by many clients costs more client
CPU than a server spends on a request), and every body is a multipart upload encoded once up front, so the client
does as little work per request as it can: it shares the machine with the server under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from harness.launcher import REPO, free_port, service_env
from harness.launcher import running as running_process
from harness.load import percentile


@dataclass(frozen=True)
class Body:
    content: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)  # sent with it besides Content-Type


def multipart(data: bytes, filename: str, field_name: str = "file", media_type: str = "image/jpeg") -> Body:
    """One file as a ``multipart/form-data`` body."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
        f"Content-Type: {media_type}\r\n\r\n"
    ).encode()
    return Body(head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}")


@dataclass
class LoadResult:
    concurrency: int
    window_s: float
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    cpu: CpuShares | None = None

    @property
    def img_s(self) -> float:
        """Throughput by Little's law: each of the ``concurrency`` clients always has one request in flight, so
        img/s = concurrency / mean latency. Unlike answers counted in the window, this does not depend on where
        the window falls between the bursts in which a batch's answers arrive (a batch of the small model holds
        16 answers for two seconds). Only when nothing failed (failed requests are not retried at once)."""
        if not self.latencies_s or self.errors:
            return self.counted_img_s
        return self.concurrency / statistics.fmean(self.latencies_s)

    @property
    def counted_img_s(self) -> float:
        """Answers within the window over its length."""
        return len(self.latencies_s) / self.window_s

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_s, 50) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_s, 99) * 1000

    def summary(self) -> dict[str, object]:
        return {
            "concurrency": self.concurrency,
            "window_s": round(self.window_s, 3),
            "requests": len(self.latencies_s),
            "img_s": round(self.img_s, 2),
            "counted_img_s": round(self.counted_img_s, 2),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "errors": self.errors,
            "cpu": None if self.cpu is None else {k: round(v, 3) for k, v in vars(self.cpu).items()},
        }


async def closed_loop(
    url: str,
    bodies: Sequence[Body],
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    server_pgid: int | None = None,
    timeout_s: float = 120,
    drain: bool = True,
) -> LoadResult:
    """Requests (one image each) that finish inside the measured window count. The window opens once ``warmup_s``
    has passed and every client has had an answer (at high concurrency the first answers take several seconds:
    until then the server is filling up, not in its steady state), and lasts ``duration_s``. Requests in flight
    when it closes are awaited (``drain``), so that the next run starts against an idle server, or abandoned. The
    machine's CPU over the window is split between the server's process group, this process and the rest."""
    records: list[tuple[float, float, str]] = []  # (answered at, latency, error or "")
    window: list[float] = []  # [opens, closes], once known
    answered: set[int] = set()
    everyone_answered = asyncio.Event()
    result = LoadResult(concurrency, duration_s)

    async def meter() -> None:
        await asyncio.sleep(warmup_s)
        await everyone_answered.wait()
        opens = time.perf_counter()
        window.extend([opens, opens + duration_s])
        cpu = CpuMeter(server_pgid)
        await asyncio.sleep(duration_s)
        result.cpu = cpu.shares()

    prepared = [(body.content, {"content-type": body.content_type, **body.headers}) for body in bodies]

    async def client(worker: int) -> None:
        transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        async with httpx.AsyncClient(transport=transport, timeout=timeout_s) as http:
            sent = 0
            while not window or time.perf_counter() < window[1]:
                content, headers = prepared[(worker + sent * concurrency) % len(prepared)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    response = await http.post(url, content=content, headers=headers)
                    error = "" if response.status_code == 200 else f"HTTP {response.status_code}"
                except httpx.HTTPError as e:
                    error = type(e).__name__
                t1 = time.perf_counter()
                records.append((t1, t1 - t0, error))
                answered.add(worker)
                if len(answered) == concurrency:
                    everyone_answered.set()
                if error:
                    await asyncio.sleep(0.01)

    clients = [asyncio.ensure_future(client(w)) for w in range(concurrency)]
    await meter()
    if not drain:
        for task in clients:
            task.cancel()
    await asyncio.gather(*clients, return_exceptions=not drain)
    for answered_at, latency, error in records:
        if window[0] <= answered_at <= window[1]:
            if error:
                result.errors[error] = result.errors.get(error, 0) + 1
            else:
                result.latencies_s.append(latency)
    return result


def run_closed_loop(
    url: str,
    bodies: Sequence[Body],
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    server_pgid: int | None = None,
    drain: bool = True,
) -> LoadResult:
    """``closed_loop`` on a fresh event loop (uvloop when installed: less client CPU per request)."""
    coro = closed_loop(
        url,
        bodies,
        concurrency=concurrency,
        warmup_s=warmup_s,
        duration_s=duration_s,
        server_pgid=server_pgid,
        drain=drain,
    )
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# --- what else the machine is doing ------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _group_ticks(pgid: int) -> int:
    """CPU ticks used so far by the live processes of a process group."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks


def _own_ticks() -> float:
    t = os.times()
    return (t.user + t.system + t.children_user + t.children_system) * _TICKS


@dataclass
class CpuShares:
    """Fractions of the whole machine's CPU over a measurement: the server, this process, everything else."""

    server: float
    client: float
    other: float


class CpuMeter:
    """Splits the machine's CPU use over an interval between a server's process group, this process, and others
    (other users of a shared machine, which make a measurement unreliable)."""

    def __init__(self, pgid: int | None = None) -> None:
        self.pgid = pgid
        self._start = self._sample()

    def _sample(self) -> tuple[int, int, int, float]:
        busy, total = _machine_ticks()
        return busy, total, _group_ticks(self.pgid) if self.pgid else 0, _own_ticks()

    def shares(self) -> CpuShares:
        busy, total, group, own = self._sample()
        b0, t0, g0, o0 = self._start
        elapsed = max(1, total - t0)
        server, client = (group - g0) / elapsed, (own - o0) / elapsed
        return CpuShares(server, client, max(0.0, (busy - b0) / elapsed - server - client))


def wait_until_quiet(max_busy: float = 0.1, settle_s: float = 2.0, timeout_s: float = 120.0) -> float:
    """Wait until the machine has been at most ``max_busy`` busy for ``settle_s`` seconds in a row (or the
    timeout passes); returns the busy fraction of the last second."""
    deadline = time.monotonic() + timeout_s
    quiet_since: float | None = None
    busy_fraction = 1.0
    while True:
        b0, t0 = _machine_ticks()
        time.sleep(0.5)
        b1, t1 = _machine_ticks()
        busy_fraction = (b1 - b0) / max(1, t1 - t0)
        now = time.monotonic()
        if busy_fraction <= max_busy:
            quiet_since = quiet_since or now
            if now - quiet_since >= settle_s:
                return busy_fraction
        else:
            quiet_since = None
        if now >= deadline:
            return busy_fraction


# --- server processes ---------------------------------------------------------------------------------------


@dataclass
class ServerSpec:
    """How to start one server under test; ``{port}`` in ``argv`` is replaced by a free port."""

    name: str
    argv: list[str]
    ready_path: str
    classify_path: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunningServer:
    url: str  # of the classify endpoint
    pgid: int


@contextlib.contextmanager
def running(spec: ServerSpec, log_path: Path, ready_timeout_s: float = 300.0) -> Iterator[RunningServer]:
    """Start the server in its own process group, wait until ready, yield its classify URL and process group;
    always stop it (and any worker processes it started) afterwards."""
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in spec.argv]
    env = service_env(port, env={k: v.replace("{port}", str(port)) for k, v in spec.env.items()})
    with running_process(
        argv, port=port, log_path=log_path, env=env, cwd=REPO, group=True, ready_path=spec.ready_path,
        ready_timeout=ready_timeout_s, stop_timeout=10,
    ) as server:  # fmt: skip
        yield RunningServer(server.url + spec.classify_path, server.pid)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
