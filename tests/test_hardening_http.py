"""What a client can make the HTTP server hold: request head size and header count, time to send a head, idle and
keep-alive connections, open connections; every answer the server writes itself is JSON. Plus SIGHUP drain (on the
process without httptools), a blank API-key list refused at start-up, X-API-Key with blanks, and HEAD on the health
routes."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.launcher import running, service_env
from tests.serving import (
    EDGE_KEY,
    EDGE_LIMITS,
    ServerProcess,
    SharedServers,
    free_port,
    image_bytes,
    multipart,
    noise_image_bytes,
    wait_until,
)

MAX_HEADER_BYTES = int(EDGE_LIMITS["DEIT_MAX_HEADER_BYTES"])
MAX_HEADERS = int(EDGE_LIMITS["DEIT_MAX_HEADERS"])
HEADER_TIMEOUT_S = float(EDGE_LIMITS["DEIT_HEADER_TIMEOUT_S"])
KEEP_ALIVE_TIMEOUT_S = int(EDGE_LIMITS["DEIT_KEEP_ALIVE_TIMEOUT_S"])
MAX_CONNECTIONS = int(EDGE_LIMITS["DEIT_MAX_CONNECTIONS"])
BACKLOG = int(EDGE_LIMITS["DEIT_BACKLOG"])
KEY = EDGE_KEY
# Slack for a loaded machine on top of a timeout; a server without the bound holds the connection far longer.
MARGIN_S = 4.0


@pytest.fixture(scope="module")
def server(tiny_store: Path, servers: SharedServers) -> ServerProcess:
    return servers.get(tiny_store, EDGE_LIMITS)


def connect(server: ServerProcess) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def send(sock: socket.socket, data: bytes) -> None:
    """Send all of ``data``; a server that answered and closed early may reset the rest, which is fine here."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (monotonic seconds)."""
    sock.settimeout(limit_s)
    data = b""
    while True:
        try:
            received = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(f"the server held the connection open for more than {limit_s} s") from None
        if not received:
            break
        data += received
    return data, time.monotonic()


def parse(data: bytes) -> tuple[int, dict[str, str], Any]:
    """Status, headers (lower-case names) and JSON body of one HTTP/1.1 answer."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    return int(lines[0].split(" ", 2)[1]), headers, json.loads(body[:length]) if length else None


def exchange(server: ServerProcess, data: bytes) -> tuple[int, dict[str, str], Any]:
    with connect(server) as sock:
        send(sock, data)
        answer, _ = read_until_closed(sock, limit_s=10)
    return parse(answer)


def assert_json_error(answer: tuple[int, dict[str, str], Any], status: int, code: str) -> str:
    got_status, headers, body = answer
    assert got_status == status, answer
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert body["error"]["code"] == code
    message: str = body["error"]["message"]
    return message


def test_oversized_header_line_gets_431_json(server: ServerProcess) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (16 * MAX_HEADER_BYTES) + b"\r\n\r\n"
    message = assert_json_error(exchange(server, request), 431, "headers_too_large")
    assert str(MAX_HEADER_BYTES) in message


def test_head_just_under_the_limit_is_served(server: ServerProcess) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Big: \r\n\r\n"
    request = head.replace(b"X-Big: ", b"X-Big: " + b"a" * (MAX_HEADER_BYTES - len(head)))
    assert len(request) == MAX_HEADER_BYTES
    status, _, body = exchange(server, request)
    assert (status, body) == (200, {"status": "alive"})


def test_too_many_headers_get_431_json(server: ServerProcess) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 5))
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n"
    message = assert_json_error(exchange(server, request), 431, "headers_too_large")
    assert f"more than {MAX_HEADERS} header fields" in message


def test_malformed_request_line_gets_400_json(server: ServerProcess) -> None:
    assert_json_error(exchange(server, b"THIS IS NOT HTTP\r\n\r\n"), 400, "bad_request")


def test_invalid_chunk_encoding_gets_400_json(server: ServerProcess) -> None:
    request = (
        b"POST /classify HTTP/1.1\r\nHost: t\r\nX-API-Key: " + KEY.encode() + b"\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"
    )
    message = assert_json_error(exchange(server, request), 400, "bad_request")
    assert "chunk" in message


def test_slowloris_head_is_cut_off_at_the_header_timeout(server: ServerProcess) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        send(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        # One header byte every 0.3 s: the deadline is for the whole head, not reset by each byte.
        while not select.select([sock], [], [], 0.3)[0]:
            if time.monotonic() - started > HEADER_TIMEOUT_S + MARGIN_S:
                raise AssertionError("the server kept reading a head that never ends")
            send(sock, b"X")
        answer, closed = read_until_closed(sock, limit_s=MARGIN_S)
    assert HEADER_TIMEOUT_S - 0.5 <= closed - started <= HEADER_TIMEOUT_S + MARGIN_S
    assert "not complete within" in assert_json_error(parse(answer), 408, "request_timeout")


def test_connection_that_sends_nothing_is_closed(server: ServerProcess) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        answer, closed = read_until_closed(sock, limit_s=HEADER_TIMEOUT_S + MARGIN_S)
    assert answer == b""  # closed without an answer nobody asked for
    assert HEADER_TIMEOUT_S - 0.5 <= closed - started <= HEADER_TIMEOUT_S + MARGIN_S


def test_idle_keep_alive_connection_is_closed_after_a_response(server: ServerProcess) -> None:
    with connect(server) as sock:
        send(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        sock.settimeout(10)
        first = b""
        while b"\r\n\r\n" not in first or len(first.partition(b"\r\n\r\n")[2]) < len(b'{"status":"alive"}'):
            first += sock.recv(65536)
        answered = time.monotonic()
        assert parse(first)[:3:2] == (200, {"status": "alive"})
        rest, closed = read_until_closed(sock, limit_s=KEEP_ALIVE_TIMEOUT_S + MARGIN_S)
    assert rest == b""
    assert closed - answered <= KEEP_ALIVE_TIMEOUT_S + MARGIN_S


def accepted_all(server: ServerProcess, count: int) -> bool:
    """At least ``count`` connections to the server are established and none waits in its accept queue, read from
    /proc/net/tcp (the Recv-Q of a listening socket is its accept queue)."""
    port = int(server.url.rsplit(":", 1)[1])
    established = waiting = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, local, _, state, queues, *_ = line.split()
        if int(local.rsplit(":", 1)[1], 16) != port:
            continue
        if state == "01":  # ESTABLISHED
            established += 1
        elif state == "0A":  # LISTEN
            waiting = int(queues.split(":")[1], 16)
    return established >= count and waiting == 0


def test_connections_above_the_cap_are_refused_with_503_json(server: ServerProcess) -> None:
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        wait_until(lambda: accepted_all(server, MAX_CONNECTIONS), what="the held connections accepted")
        with connect(server) as extra:
            started = time.monotonic()
            send(extra, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            answer, closed = read_until_closed(extra, limit_s=HEADER_TIMEOUT_S)
        assert closed - started < HEADER_TIMEOUT_S - 1  # refused at once, before the held ones time out
        status, headers, body = parse(answer)
        assert (status, body["error"]["code"]) == (503, "too_many_connections")
        assert headers["retry-after"] == "1"
        assert str(MAX_CONNECTIONS) in body["error"]["message"]
    finally:
        for sock in held:
            sock.close()
    # Once the held connections are gone, new ones are served again.
    wait_until(lambda: httpx.get(f"{server.url}/healthz").status_code == 200, timeout=10, what="served again")


def test_listen_backlog_is_the_setting(server: ServerProcess) -> None:
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to read a listening socket's backlog")
    port = server.url.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    [line] = out.splitlines()
    assert line.split()[2] == str(BACKLOG)  # Send-Q of a listening socket: its backlog


@pytest.mark.parametrize("image", [image_bytes(), noise_image_bytes(1, size=(200, 200))], ids=["small", "large"])
def test_classify_still_works(server: ServerProcess, image: bytes) -> None:
    # Head and body in one send: the large body lands in the same reads as the head, far past the head's byte limit,
    # and must not count against it.
    built = httpx.Request("POST", f"{server.url}/classify", files=multipart([image]))
    body = built.read()
    assert len(body) < 2048 or len(body) > 8 * MAX_HEADER_BYTES
    head = (
        f"POST /classify HTTP/1.1\r\nHost: t\r\nX-API-Key: {KEY}\r\nConnection: close\r\n"
        f"Content-Type: {built.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    status, _, answer = exchange(server, head.encode() + body)
    assert status == 200, answer
    assert answer["results"][0]["predictions"]


def test_pipelined_requests_are_all_answered(server: ServerProcess) -> None:
    one = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    with connect(server) as sock:
        send(sock, one * 3 + one.replace(b"Host: t", b"Host: t\r\nConnection: close"))
        answers, _ = read_until_closed(sock, limit_s=10)
    assert answers.count(b"HTTP/1.1 200 OK") == 4
    assert answers.count(b'{"status":"alive"}') == 4


def test_slow_head_after_a_first_response_is_cut_off(server: ServerProcess) -> None:
    with connect(server) as sock:
        send(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        sock.settimeout(10)
        first = b""
        while b'{"status":"alive"}' not in first:
            first += sock.recv(65536)
        started = time.monotonic()
        send(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # before the keep-alive timeout; never finished
        answer, closed = read_until_closed(sock, limit_s=HEADER_TIMEOUT_S + MARGIN_S)
    assert HEADER_TIMEOUT_S - 0.5 <= closed - started <= HEADER_TIMEOUT_S + MARGIN_S
    assert_json_error(parse(answer), 408, "request_timeout")


def test_x_api_key_is_stripped_like_bearer(server: ServerProcess) -> None:
    # Raw bytes: httpx refuses to send such values, but the server's parser keeps trailing blanks of a header.
    def models(key_header: bytes) -> int:
        request = b"GET /v1/models HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + key_header + b"\r\n\r\n"
        return exchange(server, request)[0]

    assert models(b"X-API-Key: " + KEY.encode() + b" \t ") == 200
    assert models(b"X-API-Key: " + KEY.encode() + b"x ") == 401
    assert models(b"Authorization: Bearer " + KEY.encode() + b" \t ") == 200


@pytest.mark.parametrize(("path", "status"), [("/healthz", 200), ("/readyz", 200)])
def test_head_on_health_routes(server: ServerProcess, path: str, status: int) -> None:
    response = httpx.head(f"{server.url}{path}")
    assert response.status_code == status
    assert response.content == b""
    assert response.headers["content-type"] == "application/json"


def test_api_keys_of_only_separators_is_a_start_up_error(tiny_store: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEIT_")}
    env["DEIT_MODEL_STORE"] = str(tiny_store)
    result = subprocess.run(
        [sys.executable, "-m", "service", "--api-keys", " , "], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "api_keys" in result.stderr
    assert "holds no API key" in result.stderr


def test_without_httptools_h11_still_bounds_the_head_and_sighup_drains_and_exits_0(
    tiny_store: Path, tmp_path: Path
) -> None:
    """One process for two independent things: the h11 fallback's head bound, then SIGHUP (handled by our uvicorn
    server, whichever HTTP parser runs) drains and exits 0."""
    port = free_port()
    env = service_env(port, tiny_store, {"DEIT_MAX_HEADER_BYTES": "8192"})
    launcher = "import sys; sys.modules['httptools'] = None; from service.cli import main; main()"
    with running([sys.executable, "-c", launcher], port=port, log_path=tmp_path / "server.log", env=env) as fallback:
        # h11 bounds what it buffers of a head still incomplete after a read (a read is at most 256 KiB), so the
        # head must span several reads to be refused.
        request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (4 << 20) + b"\r\n\r\n"
        with connect(fallback) as sock:
            send(sock, request)
            answer, _ = read_until_closed(sock, limit_s=10)
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert httpx.get(f"{fallback.url}/healthz").status_code == 200
        assert "serving with h11" in fallback.log()

        fallback.terminate(signal.SIGHUP)
        assert fallback.wait(timeout=30) == 0
        wait_until(lambda: "draining" in fallback.log(), timeout=5, what="draining log line")
