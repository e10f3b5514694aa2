"""One deadline and one cancel signal per request, on a real process: the body is read within the deadline, bytes in
flight have a global budget, a cut-short multipart body loses no file silently, and decoding takes turns between
requests, stops at the deadline and stops when the client leaves."""

from __future__ import annotations

import io
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.profiles import SLOW_SHARED, slow_shared
from tests.serving import (
    ServerProcess,
    SharedServers,
    expect_error,
    image_bytes,
    multipart,
    multipart_body,
    read_answer,
    rss_bytes,
    scrape,
    wait_until,
)

MAX_UPLOAD = int(SLOW_SHARED["DEIT_MAX_UPLOAD_BYTES"])  # 3 MiB
BUDGET = int(SLOW_SHARED["DEIT_MAX_INFLIGHT_UPLOAD_BYTES"])  # 8 MiB
MODEL = "slow"


@pytest.fixture(scope="module")
def server(slow_store: Path, servers: SharedServers) -> ServerProcess:
    """The shared slow-model server (``slow_shared``): what is checked here (bodies, the upload budget, decoding) comes
    before the model, so any model serves; its settings bound uploads to 3 MiB, 8 MiB of them in flight, and decode on
    two threads."""
    return servers.get(slow_store, slow_shared())


@pytest.fixture(scope="module")
def heavy_image() -> bytes:
    """A flat 16-megapixel PNG: 50 KB to send, a large fraction of a second to decode and resize."""
    buf = io.BytesIO()
    Image.new("RGB", (4000, 4000), (120, 30, 200)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def address(server: ServerProcess) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def post_body(server: ServerProcess, body: bytes, content_type: str) -> httpx.Response:
    return httpx.post(f"{server.url}/classify", content=body, headers={"Content-Type": content_type}, timeout=30)


# --- multipart bodies cut short ---------------------------------------------------------------------------------


def test_a_complete_two_file_body_gets_two_results(server: ServerProcess) -> None:
    body, content_type = multipart_body([image_bytes(), image_bytes(color=(0, 90, 0))], "cut")
    response = post_body(server, body, content_type)
    assert response.status_code == 200, response.text
    assert [r["filename"] for r in response.json()["results"]] == ["0.png", "1.png"]


@pytest.mark.parametrize("where", ["no closing boundary", "second part mid-data", "second part mid-headers"])
def test_a_multipart_body_cut_short_is_refused_whole(server: ServerProcess, where: str) -> None:
    first, second = image_bytes(), image_bytes(color=(0, 90, 0))
    full, content_type = multipart_body([first, second], "cut")
    second_starts = full.index(b"--cut", 10)
    cut = {
        "no closing boundary": full[: full.rindex(b"--cut--")],
        "second part mid-data": full[: full.index(second, second_starts) + len(second) // 2],
        "second part mid-headers": full[: second_starts + 20],
    }[where]
    response = post_body(server, cut, content_type)
    expect_error(response, 400, "bad_request")
    assert "closing boundary" in response.json()["error"]["message"]


# --- the body within the deadline ---------------------------------------------------------------------------------


def test_a_trickled_body_is_answered_at_the_deadline_not_when_it_ends(server: ServerProcess) -> None:
    length, step = 20 * 1024, 1024
    with socket.create_connection(address(server)) as sock:
        started = time.monotonic()
        sock.sendall(
            f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {length}\r\n"
            "X-Request-Timeout: 2\r\n\r\n".encode()
        )
        sent = 0
        while sent < length and not select.select([sock], [], [], 0.3)[0]:  # 20 steps of 0.3 s: 6 s in all
            sock.sendall(bytes(step))
            sent += step
        status, body = read_answer(sock)
        elapsed = time.monotonic() - started
    assert (status, body["error"]["code"]) == (408, "request_timeout"), body
    assert 1.9 <= elapsed < 3.5, elapsed
    assert sent < length


# --- the budget of upload bytes in flight ---------------------------------------------------------------------------


def open_upload(server: ServerProcess, declared: int | None, send: int) -> socket.socket:
    """A connection that declares a body of ``declared`` bytes (None: chunked), sends ``send`` of them and holds."""
    sock = socket.create_connection(address(server))
    framing = f"Content-Length: {declared}" if declared is not None else "Transfer-Encoding: chunked"
    sock.sendall(f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n{framing}\r\n\r\n".encode())
    chunk = bytes(64 * 1024)
    sent = 0
    try:
        while sent < send:
            sock.sendall(chunk if declared is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
    except OSError:  # refused and closed by the server
        pass
    return sock


def answered_at_once(sock: socket.socket) -> tuple[int, dict[str, object]] | None:
    if not select.select([sock], [], [], 2.0)[0]:
        return None
    status, body = read_answer(sock)
    return status, body


def test_uploads_beyond_the_byte_budget_are_refused_before_they_are_read(server: ServerProcess) -> None:
    """30 clients each stalled mid-way through a 3 MiB upload: only the budget's worth is ever held in memory."""
    pid = server.process.pid
    wait_until(lambda: scrape(server).value("deit_upload_bytes_in_flight") == 0, what="no upload in flight")
    before = rss_bytes(pid)
    held: list[socket.socket] = []
    refused: list[tuple[int, dict[str, object]]] = []
    try:
        for _ in range(30):
            sock = open_upload(server, MAX_UPLOAD, send=MAX_UPLOAD - 64 * 1024)
            answer = answered_at_once(sock) if len(held) >= BUDGET // MAX_UPLOAD else None
            if answer is None:
                held.append(sock)
            else:
                refused.append(answer)
                sock.close()
        in_flight = scrape(server).value("deit_upload_bytes_in_flight")
        grown = rss_bytes(pid) - before
        # A body of unknown length reserves as it arrives: refused once it no longer fits.
        chunked = open_upload(server, None, send=MAX_UPLOAD - 64 * 1024)
        chunked_answer = answered_at_once(chunked)
        chunked.close()
    finally:
        for sock in held:
            sock.close()
    assert len(held) == BUDGET // MAX_UPLOAD, len(held)
    assert len(refused) == 30 - len(held)
    assert {(status, body["error"]["code"]) for status, body in refused} == {(503, "overloaded")}  # type: ignore[index]
    assert in_flight == len(held) * MAX_UPLOAD
    assert grown < BUDGET + 24 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB with 30 uploads stalled"
    assert chunked_answer is not None
    assert chunked_answer[0] == 503, chunked_answer
    # Closed connections give their bytes back: the next upload is accepted.
    wait_until(lambda: scrape(server).value("deit_upload_bytes_in_flight") == 0, what="budget given back")
    assert httpx.post(f"{server.url}/classify", files=multipart([image_bytes()])).status_code == 200


def test_a_refusal_by_the_budget_carries_retry_after(server: ServerProcess) -> None:
    held = [open_upload(server, MAX_UPLOAD, send=64 * 1024) for _ in range(BUDGET // MAX_UPLOAD)]
    try:
        wait_until(
            lambda: scrape(server).value("deit_upload_bytes_in_flight") == len(held) * MAX_UPLOAD, what="reserved"
        )
        response = httpx.post(f"{server.url}/classify", files=multipart([image_bytes(size=(900, 900), fmt="BMP")]))
    finally:
        for sock in held:
            sock.close()
    expect_error(response, 503, "overloaded")
    assert response.headers["Retry-After"] == "1"


# --- decoding under the deadline and the cancel signal --------------------------------------------------------------


def decoded(server: ServerProcess) -> float:
    return scrape(server).value("deit_preprocess_duration_seconds_count", model=MODEL)


def settled_decodes(server: ServerProcess) -> float:
    """The decode count once the images being decoded have finished (those never started stay uncounted)."""
    last = decoded(server)
    while True:
        time.sleep(1.0)
        now = decoded(server)
        if now == last:
            return now
        last = now


def test_decoding_stops_at_the_deadline_and_others_are_served_meanwhile(
    server: ServerProcess, heavy_image: bytes
) -> None:
    first = scrape(server)
    before, dropped_before = decoded(server), first.value("deit_dropped_total", reason="deadline")
    decode_s_before = first.value("deit_preprocess_duration_seconds_sum", model=MODEL)
    heavy = multipart([heavy_image] * 32)
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        slow = pool.submit(
            httpx.post, f"{server.url}/classify", files=heavy, headers={"X-Request-Timeout": "2"}, timeout=60
        )
        wait_until(lambda: decoded(server) > before, what="the heavy request being decoded", every=0.25)
        small_started = time.monotonic()
        small = httpx.post(f"{server.url}/classify", files=multipart([image_bytes()]), timeout=60)
        small_s = time.monotonic() - small_started
        response = slow.result()
        elapsed = time.monotonic() - started
    expect_error(response, 504, "deadline_exceeded")
    assert 1.9 <= elapsed < 3.5, elapsed
    assert small.status_code == 200
    ran = settled_decodes(server) - before
    assert ran < 32, "images of an expired request kept being decoded"
    # Taking turns, the small request waits for at most one heavy image per thread; first come, first served, it
    # would wait for all of them. Relative to one heavy decode, so that a loaded machine does not change the verdict.
    one_decode_s = (scrape(server).value("deit_preprocess_duration_seconds_sum", model=MODEL) - decode_s_before) / ran
    assert small_s < 2 * one_decode_s + 0.5, f"a one-image request waited {small_s:.2f} s ({one_decode_s:.2f} s/image)"
    assert scrape(server).value("deit_dropped_total", model=MODEL, reason="deadline") - dropped_before == 32


def test_decoding_stops_when_the_client_leaves(server: ServerProcess, heavy_image: bytes) -> None:
    before = decoded(server)
    dropped_before = scrape(server).value("deit_dropped_total", model=MODEL, reason="disconnect")
    request = httpx.Request("POST", f"{server.url}/classify", files=multipart([heavy_image] * 32))
    body = request.read()
    with socket.create_connection(address(server)) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
        sock.sendall(f"POST /classify HTTP/1.1\r\n{head}\r\n".encode() + body)
        wait_until(lambda: decoded(server) >= before + 2, what="the request half-way through its decoding", every=0.25)
    ran = settled_decodes(server) - before
    assert ran < 16, f"{ran:.0f} of 32 images decoded for a client that left"
    dropped = scrape(server).value("deit_dropped_total", model=MODEL, reason="disconnect") - dropped_before
    assert dropped == 32
    assert httpx.get(f"{server.url}/healthz").status_code == 200
