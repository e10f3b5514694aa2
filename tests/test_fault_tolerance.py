"""Fault tolerance behind the real load balancer: nginx with deploy/nginx/nginx.conf's proxy rules in front of two
real ``deit-serve`` replicas (the fewest with which one can go down while another serves), under concurrent client
load. A replica killed (SIGKILL) while it holds requests, and a rolling restart (SIGTERM, drain, start again on the
same port) cost the clients nothing: every request sent gets exactly one answer, a 200, served by exactly one
replica.

"Answered twice" means two 200 results for one client request: two answers at the client, two 200 lines for its
request id in nginx's access log, or 200 logged for it by two replicas (or twice by one). A retried request may show
failed attempts first (a connection cut or refused, a 503 from a draining or starting replica); that is the retry.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest

from tests.serving import (
    REPO,
    Scrape,
    ServerProcess,
    free_port,
    noise_image_bytes,
    spawn_server,
    stop_process,
    wait_ready,
    wait_until,
)

NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
REPLICA_ENV = {
    "DEIT_TORCH_THREADS": "1",
    "DEIT_FORWARD_WORKERS": "1",
    "DEIT_PREPROCESS_THREADS": "1",
    "DEIT_DRAIN_TIMEOUT_S": "10",
}
REPLICAS = 2  # a rolling restart of both starts four processes in all; the killed replica is not started again
CLIENTS = 8
PAUSE_S = 0.5  # between one client's requests: every replica busy, yet CPU left for restarts on a small machine
MAX_PER_CLIENT = 200  # bounds each run: at most CLIENTS × MAX_PER_CLIENT requests
LOAD_DEADLINE_S = 150.0  # and in time; a restart is mostly importing PyTorch, slow on a busy machine


# --- nginx ----------------------------------------------------------------------------------------------------------


def _substitute(text: str, pattern: str, replacement: str, what: str) -> str:
    """Replace exactly one match; anything else means the real config changed shape and the test must follow."""
    new, count = re.subn(pattern, lambda _: replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise AssertionError(f"{NGINX_CONF.name}: expected one {what}, found {count}")
    return new


def loopback_config(source: str, listen_port: int, upstream_ports: Sequence[int], workdir: Path) -> str:
    """The real nginx.conf with only where it runs changed: a static upstream of loopback ports instead of Docker's
    DNS, a loopback listener, and pid, logs and temporary files in ``workdir``. Every proxy rule is the file's own."""
    text = _substitute(source, r"^[ \t]*resolver\s[^;]*;[^\n]*\n", "", "resolver")
    server = re.search(r"^([ \t]*)server\s+\S+\s+resolve\b([^;]*);", text, flags=re.MULTILINE)
    assert server is not None, f"{NGINX_CONF.name}: no `server ... resolve` line in the upstream"
    indent, params = server.groups()
    servers = "\n".join(f"{indent}server 127.0.0.1:{port}{params};" for port in upstream_ports)
    text = _substitute(text, r"^[ \t]*server\s+\S+\s+resolve\b[^;]*;", servers, "upstream server")
    text = _substitute(text, r"\blisten\s+80;", f"listen 127.0.0.1:{listen_port};", "listen 80")
    text = _substitute(text, r"\baccess_log\s+/dev/stdout\b", f"access_log {workdir}/access.log", "access_log")
    text = _substitute(text, r"\berror_log\s+/dev/stderr\b", f"error_log {workdir}/error.log", "error_log")
    text = _substitute(text, r"^worker_processes\s+\w+;", "worker_processes 2;", "worker_processes")
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = "".join(f"    {kind}_temp_path {workdir}/{kind}_temp;\n" for kind in kinds)
    text = _substitute(text, r"^http\s*\{\n", "http {\n" + temp, "http block")
    head = f"pid {workdir}/nginx.pid;\n"
    if os.geteuid() == 0:  # workers as the user running the test, not nginx's default `nobody`
        head += f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"
    return head + text


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    url: str
    workdir: Path

    def access_records(self) -> list[dict[str, Any]]:
        path = self.workdir / "access.log"
        return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]

    def error_lines(self, since: int = 0) -> list[str]:
        return (self.workdir / "error.log").read_text(errors="replace").splitlines()[since:]


def start_nginx(binary: str, config: str, workdir: Path, port: int) -> Nginx:
    conf = workdir / "nginx.conf"
    conf.write_text(config)
    base = [binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]
    checked = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, f"nginx -t rejected the generated config:\n{checked.stderr}\n{config}"
    with (workdir / "nginx.out").open("wb") as out:
        process = subprocess.Popen([*base, "-g", "daemon off;"], stdout=out, stderr=subprocess.STDOUT)
    nginx = Nginx(process, f"http://127.0.0.1:{port}", workdir)

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}: {(workdir / 'error.log').read_text()}")
        try:
            return httpx.get(f"{nginx.url}/nginx-health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=15, what="nginx answering")
    return nginx


def stop_nginx(nginx: Nginx) -> None:
    """Fast shutdown of the master process (it stops its workers), SIGKILL if it hangs."""
    if nginx.process.poll() is None:
        nginx.process.send_signal(signal.SIGTERM)
        try:
            nginx.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            nginx.process.kill()
            nginx.process.wait()


# --- replicas behind it ---------------------------------------------------------------------------------------------


@dataclass
class Cluster:
    store: Path
    workdir: Path
    ports: list[int]
    nginx: Nginx | None = None
    replicas: dict[int, ServerProcess] = field(default_factory=dict)
    started: list[ServerProcess] = field(default_factory=list)  # every process, restarts included

    @property
    def url(self) -> str:
        assert self.nginx is not None
        return self.nginx.url

    def start(self, port: int) -> ServerProcess:
        replica = spawn_server(self.store, self.workdir, port, env=REPLICA_ENV)
        self.replicas[port] = replica
        self.started.append(replica)
        return replica

    def ensure_ready(self) -> None:
        """Every replica up and ready (a previous check may have killed one)."""
        for port in self.ports:
            if port not in self.replicas or self.replicas[port].process.poll() is not None:
                self.start(port)
        for replica in self.replicas.values():
            wait_ready(replica.url, replica.process)

    def error_line_count(self) -> int:
        assert self.nginx is not None
        return len(self.nginx.error_lines())

    def upstream_errors(self, port: int, since: int) -> dict[str, int]:
        """nginx's reasons for failed attempts at one replica after error-log line ``since``: refused, reset, ..."""
        assert self.nginx is not None
        reasons: Counter[str] = Counter()
        for line in self.nginx.error_lines(since):
            if f'upstream: "http://127.0.0.1:{port}/' in line:
                match = re.search(r"\[\w+\] \d+#\d+: \*\d+ (.*?) while", line)
                reasons[match.group(1) if match else line] += 1
        return dict(reasons)

    def replica_records(self) -> list[tuple[int, dict[str, object]]]:
        """(port, record) for every /classify access-log line of every replica process started."""
        return [
            (int(replica.url.rsplit(":", 1)[1]), record)
            for replica in self.started
            for record in replica.log_records()
            if record.get("message") == "request" and record.get("path") == "/classify"
        ]


@pytest.fixture(scope="module")
def cluster(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if binary is None:
        if os.environ.get("CI"):  # CI installs it (scripts/test), so there its absence is a failure
            pytest.fail("nginx is not installed; scripts/test installs Debian's 'nginx'")
        pytest.skip("nginx is not installed (apt-get install nginx; scripts/test does, as root)")
    ports: set[int] = set()
    while len(ports) < 1 + REPLICAS:
        ports.add(free_port())
    listen, *upstream = sorted(ports)
    workdir = tmp_path_factory.mktemp("fault-tolerance")
    config = loopback_config(NGINX_CONF.read_text(), listen, upstream, workdir)
    cluster = Cluster(tiny_store, workdir, upstream)
    try:
        for port in upstream:
            cluster.start(port)
        cluster.nginx = start_nginx(binary, config, workdir, listen)
        cluster.ensure_ready()
        yield cluster
    finally:
        for replica in cluster.started:
            stop_process(replica.process)
        if cluster.nginx is not None:
            stop_nginx(cluster.nginx)


# --- load and its accounting ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    request_id: str
    status: int | None  # None: no HTTP answer at all
    detail: str  # the error code or exception when not a proper 200
    echoed: bool  # the answer carries this request's id and file name


class Load:
    """CLIENTS threads, each with its own keep-alive connection to nginx, each request with a unique X-Request-ID."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.sent: list[str] = []
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + LOAD_DEADLINE_S
        self._images = [noise_image_bytes(seed) for seed in range(CLIENTS)]
        self._threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads), "a client did not finish"

    def answered(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_answers(self, count: int, timeout: float = 30.0) -> None:
        wait_until(lambda: self.answered() >= count, timeout=timeout, what=f"{count} answers")

    def _client(self, client: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            for seq in range(MAX_PER_CLIENT):
                if self._stop.is_set() or time.monotonic() > self._deadline:
                    return
                request_id = f"{self.name}-{client}-{seq}"
                with self._lock:
                    self.sent.append(request_id)
                self._record(self._send(http, client, request_id))
                self._stop.wait(PAUSE_S)

    def _send(self, http: httpx.Client, client: int, request_id: str) -> Outcome:
        files = [("file", (f"{request_id}.png", self._images[client], "image/png"))]
        try:
            response = http.post("/classify", files=files, headers={"X-Request-ID": request_id})
        except httpx.HTTPError as e:
            return Outcome(request_id, None, f"{type(e).__name__}: {e}", False)
        if response.status_code != 200:
            return Outcome(request_id, response.status_code, response.text[:200], False)
        results = response.json()["results"]
        echoed = response.headers.get("x-request-id") == request_id and [r["filename"] for r in results] == [
            f"{request_id}.png"
        ]
        return Outcome(request_id, 200, "", echoed)

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)


def account(load: Load, cluster: Cluster) -> dict[str, Any]:
    """Every way a request could be lost or answered twice, counted at the client, in nginx and in the replicas."""
    assert cluster.nginx is not None
    ids = set(load.sent)
    assert len(ids) == len(load.sent), "request ids are unique"
    at_client = Counter(o.request_id for o in load.outcomes)
    nginx_lines = [r for r in cluster.nginx.access_records() if r["request_id"] in ids]
    at_nginx = Counter(r["request_id"] for r in nginx_lines)
    served: dict[str, list[int]] = {}  # request id → ports of the replicas that logged 200 for it
    failed_attempts: Counter[str] = Counter()
    for port, record in cluster.replica_records():
        request_id = str(record["request_id"])
        if request_id in ids and record["status"] == 200:
            served.setdefault(request_id, []).append(port)
        elif request_id in ids:
            failed_attempts[f"{record['status']} {record.get('error')}"] += 1
    attempts = [r["upstream_status"].split(", ") for r in nginx_lines]
    # The last upstream nginx names for a request is the replica that logged its 200.
    last_upstream = {r["request_id"]: r["upstream"].split(", ")[-1] for r in nginx_lines if r["status"] == 200}
    return {
        "sent": len(ids),
        "client_statuses": dict(Counter(o.status for o in load.outcomes)),
        "lost": sorted(ids - {o.request_id for o in load.outcomes if o.status is not None}),
        "not_200": [(o.request_id, o.status, o.detail[:120]) for o in load.outcomes if o.status != 200],
        "answer_not_for_request": [o.request_id for o in load.outcomes if o.status == 200 and not o.echoed],
        "twice_at_client": sorted(i for i, n in at_client.items() if n > 1),
        "nginx_statuses": dict(Counter(r["status"] for r in nginx_lines)),
        "nginx_lines_not_one": sorted(i for i in ids if at_nginx[i] != 1),
        "served_once": sum(len(ports) == 1 for ports in served.values()),
        "served_not_once": sorted(i for i in ids if len(served.get(i, [])) != 1),
        "served_elsewhere_than_nginx_says": sorted(
            i for i, ports in served.items() if last_upstream.get(i) != f"127.0.0.1:{ports[0]}"
        ),
        "retried": sum(len(a) > 1 for a in attempts),
        "failed_upstream_attempts": dict(Counter(s for a in attempts for s in a[:-1])),
        "failed_replica_attempts": dict(failed_attempts),
    }


def assert_exactly_once(summary: dict[str, Any]) -> None:
    """Only 200s, each request answered once at the client, once by nginx, by one replica: the one nginx names."""
    sent = summary["sent"]
    print(f"\n{summary}")
    assert summary["client_statuses"] == {200: sent}, summary
    assert summary["nginx_statuses"] == {200: sent}, summary
    assert summary["served_once"] == sent, summary
    for problem in ("lost", "not_200", "answer_not_for_request", "twice_at_client", "nginx_lines_not_one"):
        assert summary[problem] == [], summary
    assert summary["served_not_once"] == [], summary
    assert summary["served_elsewhere_than_nginx_says"] == [], summary


# --- the checks -----------------------------------------------------------------------------------------------------


def held_requests(port: int) -> int:
    """Connections to ``port`` on loopback with request bytes the server has not read (Linux /proc/net/tcp)."""
    held = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if local == f"0100007F:{port:04X}" and state == "01" and int(queues.split(":")[1], 16) > 0:
            held += 1
    return held


class SlowUpload:
    """One image sent straight to a replica, its body in two halves with a pause between: in flight until released,
    like a slow client's upload, so that a drain begun meanwhile has work to wait for."""

    BOUNDARY = "slow-upload"

    def __init__(self, replica: ServerProcess) -> None:
        self.replica = replica
        self.released = threading.Event()
        self.body = (
            (
                f'--{self.BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + noise_image_bytes(99)
            + f"\r\n--{self.BOUNDARY}--\r\n".encode()
        )

    def _chunks(self) -> Iterator[bytes]:
        half = len(self.body) // 2
        yield self.body[:half]
        self.released.wait(timeout=30)
        yield self.body[half:]

    def send(self) -> int:
        headers = {
            "Content-Type": f"multipart/form-data; boundary={self.BOUNDARY}",
            "Content-Length": str(len(self.body)),
            "X-Request-ID": f"slow-upload-{self.replica.url.rsplit(':', 1)[1]}",
        }
        response = httpx.post(f"{self.replica.url}/classify", content=self._chunks(), headers=headers, timeout=60)
        return response.status_code


def holds_a_request(replica: ServerProcess) -> bool:
    """Whether the replica has had a request in flight besides the scrapes for 3 scrapes in a row (nginx's requests
    take milliseconds; a held upload stays)."""
    for _ in range(3):
        text = httpx.get(f"{replica.url}/metrics", timeout=10).text
        if Scrape.parse(text).value("deit_inflight_requests") < 2:
            return False
        time.sleep(0.05)
    return True


def draining(replica: ServerProcess) -> bool:
    return httpx.get(f"{replica.url}/readyz", timeout=10).status_code == 503


def serves(replica: ServerProcess, load: Load) -> bool:
    return answered_200(replica, load) > 0


def answered_200(replica: ServerProcess, load: Load) -> int:
    """How many of ``load``'s requests ``replica`` answered with 200."""
    sent = set(load.sent)
    return sum(
        r.get("message") == "request" and r.get("status") == 200 and r.get("request_id") in sent
        for r in replica.log_records()
    )


def test_the_loopback_config_keeps_every_rule_but_where_nginx_runs(tmp_path: Path) -> None:
    source = NGINX_CONF.read_text()
    config = loopback_config(source, 18080, [18001, 18002, 18003], tmp_path)
    kept = set(config.splitlines())
    changed = [line for line in source.splitlines() if line not in kept]
    assert [line.split()[0] for line in changed] == [
        "worker_processes",
        "resolver",
        "access_log",
        "error_log",
        "server",
        "listen",
    ], changed
    assert config.count("server 127.0.0.1:1800") == 3
    assert "max_fails=0;" in config.split("server 127.0.0.1:18003")[1].splitlines()[0]
    rules = [line for line in source.splitlines() if line.strip().startswith(("proxy_", "keepalive", "least_conn"))]
    assert rules, "the proxy rules under test"
    assert all(line in kept for line in rules)


@pytest.mark.slow
def test_a_rolling_restart_under_load_answers_every_request_once_with_200(cluster: Cluster) -> None:
    cluster.ensure_ready()
    errors_from = cluster.error_line_count()
    started = time.monotonic()
    stopped: list[ServerProcess] = []
    restarted: list[ServerProcess] = []
    exit_codes: list[int] = []
    slow_uploads: list[int] = []
    with Load(cluster.url, "roll") as load, ThreadPoolExecutor(1) as pool:
        load.wait_answers(40)
        for port in cluster.ports:
            old = cluster.replicas[port]
            stopped.append(old)
            upload = SlowUpload(old)
            answer = pool.submit(upload.send)
            try:
                wait_until(partial(holds_a_request, old), timeout=20, what="the slow upload in flight")
                old.terminate(signal.SIGTERM)
                wait_until(partial(draining, old), timeout=10, what=f"replica {port} draining")
                time.sleep(0.5)  # the drain waits for the upload; nginx's requests meanwhile get 503, go elsewhere
            finally:
                upload.released.set()
            slow_uploads.append(answer.result(timeout=60))
            exit_codes.append(old.wait(timeout=30))
            new = cluster.start(port)
            wait_ready(new.url, new.process, timeout=90)
            restarted.append(new)
            # The next replica goes down only once nginx sends this one traffic again.
            wait_until(partial(serves, new, load), timeout=20, what=f"traffic to replica {port}")
        load.wait_answers(load.answered() + 16)
    took = time.monotonic() - started
    summary = account(load, cluster)
    drains = [r.get("inflight") for old in stopped for r in old.log_records() if r.get("message") == "draining"]
    summary.update(
        seconds=round(took, 1),
        served_before_restart=[answered_200(old, load) for old in stopped],
        served_after_restart=[answered_200(new, load) for new in restarted],
        inflight_at_sigterm=drains,
        slow_uploads=slow_uploads,
        exit_codes=exit_codes,
        nginx_errors={port: cluster.upstream_errors(port, errors_from) for port in cluster.ports},
    )
    assert_exactly_once(summary)
    assert exit_codes == [0] * REPLICAS, summary
    assert slow_uploads == [200] * REPLICAS, f"a draining replica finishes what it accepted: {summary}"
    assert len(drains) == REPLICAS, summary
    assert all(isinstance(n, int) and n >= 1 for n in drains), f"each drain had work to finish: {summary}"
    assert summary["retried"] > 0, f"no request needed a retry, so the restarts went unnoticed: {summary}"


@pytest.mark.slow
def test_a_replica_killed_under_load_answers_every_request_once_with_200(cluster: Cluster) -> None:
    cluster.ensure_ready()
    errors_from = cluster.error_line_count()
    victim = cluster.ports[1]
    replica = cluster.replicas[victim]
    started = time.monotonic()
    with Load(cluster.url, "kill") as load:
        load.wait_answers(40)
        # Frozen first, so that the kill is certain to cut requests nginx has already sent it.
        replica.terminate(signal.SIGSTOP)
        try:
            wait_until(lambda: held_requests(victim) > 0, timeout=5, what="requests sent to the frozen replica")
            held = held_requests(victim)
        finally:
            replica.terminate(signal.SIGKILL)
        code = replica.wait(timeout=10)
        load.wait_answers(load.answered() + 60)
    took = time.monotonic() - started
    summary = account(load, cluster)
    errors = cluster.upstream_errors(victim, errors_from)
    cut = sum(n for reason, n in errors.items() if "refused" not in reason)
    summary.update(seconds=round(took, 1), held_at_sigkill=held, cut=cut, exit_code=code, nginx_errors=errors)
    assert_exactly_once(summary)
    assert code == -signal.SIGKILL
    assert cut >= held, f"every request the killed replica held was cut, then retried: {summary}"
