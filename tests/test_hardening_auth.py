"""API keys and traceability against a real ``deit-serve`` process: keys guard classification and model listings
(and /metrics when asked), probes stay open, and every request has an id and exactly one JSON log line."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.profiles import KEYED_KEYS, keyed_server
from tests.serving import EDGE_KEY, EDGE_LIMITS, EndlessBody, ServerProcess, SharedServers, image_bytes

KEYS = KEYED_KEYS


@pytest.fixture(scope="module")
def keyed(tiny_store: Path, servers: SharedServers) -> ServerProcess:
    """Two API keys; probes and /metrics open, the access log on (the defaults)."""
    return keyed_server(servers, tiny_store)


def call(server: ServerProcess, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    if method == "POST":
        files = [("file", ("a.png", image_bytes(), "image/png"))]
        return httpx.post(f"{server.url}{path}", files=files, headers=headers)
    return httpx.get(f"{server.url}{path}", headers=headers)


GUARDED = [("POST", "/classify"), ("POST", "/embed"), ("GET", "/v1/models"), ("GET", "/v1/models/tiny")]
REFUSED_CREDENTIALS = {
    "none": {},
    "wrong-bearer": {"Authorization": "Bearer k3-secret"},
    "wrong-header-key": {"X-API-Key": "k1-secreT"},
    "empty-bearer": {"Authorization": "Bearer"},
    "basic-scheme": {"Authorization": f"Basic {KEYS[0]}"},
    "key-prefix": {"X-API-Key": KEYS[0][:-1]},
}
ACCEPTED_CREDENTIALS = {
    "bearer-first": {"Authorization": f"Bearer {KEYS[0]}"},
    "bearer-lowercase-scheme": {"Authorization": f"bearer {KEYS[1]}"},
    "header-second": {"X-API-Key": KEYS[1]},
}


@pytest.mark.parametrize(("method", "path"), GUARDED)
@pytest.mark.parametrize("credentials", REFUSED_CREDENTIALS)
def test_guarded_endpoints_refuse_requests_without_a_valid_key(
    keyed: ServerProcess, method: str, path: str, credentials: str
) -> None:
    response = call(keyed, method, path, REFUSED_CREDENTIALS[credentials])
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert not any(key in response.text for key in KEYS)


@pytest.mark.parametrize(("method", "path"), GUARDED)
@pytest.mark.parametrize("credentials", ACCEPTED_CREDENTIALS)
def test_guarded_endpoints_accept_either_key_either_way(
    keyed: ServerProcess, method: str, path: str, credentials: str
) -> None:
    response = call(keyed, method, path, ACCEPTED_CREDENTIALS[credentials])
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_probes_and_metrics_stay_open_by_default(keyed: ServerProcess, path: str) -> None:
    assert httpx.get(f"{keyed.url}{path}").status_code == 200


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(keyed: ServerProcess) -> None:
    body = EndlessBody()  # 128 MiB offered
    response = httpx.post(f"{keyed.url}/classify", content=body, headers={"Content-Type": "image/png"}, timeout=30)
    assert response.status_code == 401
    assert response.headers["connection"] == "close"
    assert body.pulled < 32 * 2**20


def test_metrics_need_a_key_when_protected(tiny_store: Path, servers: SharedServers) -> None:
    server = servers.get(tiny_store, EDGE_LIMITS)  # DEIT_PROTECT_METRICS=true, shared with the HTTP-edge tests
    refused = httpx.get(f"{server.url}/metrics")
    wrong = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer nope"})
    allowed = httpx.get(f"{server.url}/metrics", headers={"X-API-Key": EDGE_KEY})
    probes = [httpx.get(f"{server.url}{path}").status_code for path in ("/healthz", "/readyz")]
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    assert wrong.status_code == 401
    assert allowed.status_code == 200
    assert "deit_requests_total" in allowed.text
    assert probes == [200, 200]


# --- traceability ----------------------------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {KEYS[0]}"}


def access_lines(server: ServerProcess, request_id: str) -> list[dict[str, Any]]:
    return [r for r in server.log_records() if r.get("message") == "request" and r.get("request_id") == request_id]


def wait_for_access_line(server: ServerProcess, request_id: str) -> dict[str, Any]:
    """The access line is written after the response is sent: poll the log briefly (bounded)."""
    for _ in range(200):
        lines = access_lines(server, request_id)
        if lines:
            assert len(lines) == 1, lines
            return lines[0]
        httpx.get(f"{server.url}/healthz")  # a round trip through the server's event loop
    raise AssertionError(f"no access log line for {request_id}")


def test_a_valid_request_id_is_echoed_and_logged_once_with_batching_details(keyed: ServerProcess) -> None:
    request_id = f"trace-{uuid.uuid4().hex[:8]}.retry:1"  # unique: the server is shared
    files = [("file", (f"{i}.png", image_bytes(color=(i, 50, 90)), "image/png")) for i in range(2)]
    response = httpx.post(f"{keyed.url}/classify", files=files, headers={**AUTH, "X-Request-ID": request_id})
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == request_id

    line = wait_for_access_line(keyed, request_id)
    assert line["status"] == 200
    assert line["model"] == "tiny"
    assert line["images"] == 2
    assert line["method"] == "POST"
    assert line["path"] == "/classify"
    assert line["batch_size"]
    assert all(1 <= b <= 2 for b in line["batch_size"])
    # Times in milliseconds within the request's own (a forward pass may take well under a millisecond; that it is
    # timed in its own thread is checked against the pass's own clock in tests/test_forward_workers.py).
    for phase in ("queue_ms", "inference_ms"):
        assert isinstance(line[phase], float | int), line
        assert 0 <= line[phase] <= line["duration_ms"], line
    assert line["level"] == "info"


@pytest.mark.parametrize("incoming", [None, "", "has space", "x" * 129, "semi;colon", "naïve".encode()])
def test_a_missing_or_invalid_request_id_is_replaced(keyed: ServerProcess, incoming: str | bytes | None) -> None:
    headers = [(name.encode(), value.encode()) for name, value in AUTH.items()]
    if incoming is not None:
        headers.append((b"X-Request-ID", incoming.encode() if isinstance(incoming, str) else incoming))
    response = httpx.get(f"{keyed.url}/v1/models", headers=headers)
    generated = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert generated != incoming
    assert wait_for_access_line(keyed, generated)["status"] == 200


def test_refused_requests_are_traced_too(keyed: ServerProcess) -> None:
    no_key, text = (f"{what}-{uuid.uuid4().hex[:8]}" for what in ("no-key", "txt"))  # unique: the server is shared
    unauthorized = httpx.get(f"{keyed.url}/v1/models", headers={"X-Request-ID": no_key})
    unsupported = httpx.post(
        f"{keyed.url}/classify",
        content=b"text",
        headers={**AUTH, "Content-Type": "text/plain", "X-Request-ID": text},
    )
    assert unauthorized.headers["X-Request-ID"] == no_key
    assert unsupported.headers["X-Request-ID"] == text
    assert wait_for_access_line(keyed, no_key)["status"] == 401
    line = wait_for_access_line(keyed, text)
    assert line["status"] == 415
    assert line["error"] == "unsupported_media_type"
    assert line["model"] == "tiny"
