"""The edge, second round, against real ``deit-serve`` processes with API keys: a body is read only once the request
may send it and within its route's bound, every JSON parser is bounded in depth, pixels are checked before the
queue, echoed client text always encodes, and a stopped request leaves no future unobserved.

Everything here runs on the HTTP-edge tests' shared server (``EDGE_LIMITS``), which none of them changes. What unloads
a model or adds one to a store (a model's drain on unload, a symlinked model, a config asking for too many layers)
is in test_model_repository, on its server; a load past its timeout and SIGTERM during a load, in
test_hardening_overload (on its deadline server)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.routing import APIRoute

from service.api import hf, native, v2
from service.http.json_body import nests_deeper_than
from service.http.responses import dumps
from tests.profiles import assert_clean_log
from tests.serving import (
    EDGE_KEY,
    EDGE_LIMITS,
    EndlessBody,
    ServerProcess,
    SharedServers,
    image_bytes,
    plain_error,
    read_answer,
)

KEY = EDGE_KEY
AUTH = {"X-API-Key": KEY}
SIZE = 32  # the tiny model's input size
PIXELS = 3 * SIZE * SIZE
INFER = "/v2/models/tiny/infer"


@pytest.fixture(scope="module")
def edge(tiny_store: Path, servers: SharedServers) -> ServerProcess:
    """The HTTP-edge tests' server (one key, the suite's ``tiny`` model): for tests that change nothing on it."""
    return servers.get(tiny_store, EDGE_LIMITS)


def raw_request(server: ServerProcess, head: str, body: bytes = b"") -> socket.socket:
    """A connection that has sent ``head`` (CRLF line ends added) and ``body``, left open for the answer."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body)
    return sock


@pytest.fixture
def log_mark(edge: ServerProcess) -> int:
    """Where the shared server's log stands when the test starts: what other tests logged before is not its own."""
    return len(edge.log())


# --- 1. a body is read only when it may be, within its route's bound -----------------------------------------


def test_the_repository_index_answers_401_before_reading_a_declared_body(edge: ServerProcess) -> None:
    # 100 MiB declared, not one byte sent: the answer comes without the body.
    sock = raw_request(
        edge, "POST /v2/repository/index HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: 104857600"
    )
    with sock:
        status, body = read_answer(sock)
    assert status == 401, body
    assert body == {"error": "an API key is required (Authorization: Bearer <key> or X-API-Key)"}


def test_the_repository_index_refuses_a_chunked_body_without_a_key_unread(edge: ServerProcess) -> None:
    body = EndlessBody(b" " * 65536)  # 128 MiB offered
    response = httpx.post(f"{edge.url}/v2/repository/index", content=body, timeout=30)
    assert plain_error(response, 401).startswith("an API key is required")
    assert body.pulled < 32 * 2**20


def test_malformed_json_without_a_key_is_401_not_a_parse_error(edge: ServerProcess) -> None:
    response = httpx.post(f"{edge.url}/v2/repository/index", content=b"{")
    plain_error(response, 401)


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_the_repository_index_body_is_capped_even_with_a_key(edge: ServerProcess, chunked: bool) -> None:
    payload = b'{"ready": true, "pad": "' + b"x" * (2 * 2**20) + b'"}'
    content: bytes | Iterator[bytes] = iter([payload[i : i + 65536] for i in range(0, len(payload), 65536)])
    response = httpx.post(
        f"{edge.url}/v2/repository/index", content=content if chunked else payload, headers=AUTH, timeout=30
    )
    assert "65536" in plain_error(response, 413)


def test_the_repository_index_reads_its_flag_after_authentication(edge: ServerProcess) -> None:
    url = f"{edge.url}/v2/repository/index"
    everything = httpx.post(url, headers=AUTH)
    ready = httpx.post(url, json={"ready": True}, headers=AUTH)
    assert everything.status_code == ready.status_code == 200
    assert {r["name"] for r in ready.json()} <= {r["name"] for r in everything.json()}
    assert all(r["state"] == "READY" for r in ready.json())
    assert "'ready' must be true or false" in plain_error(httpx.post(url, json={"ready": "yes"}, headers=AUTH), 400)
    assert "JSON object" in plain_error(httpx.post(url, json=[1], headers=AUTH), 400)


def test_no_route_declares_a_body_that_fastapi_would_read_before_its_dependencies() -> None:
    """FastAPI reads (whole) a declared body before it runs a route's dependencies, authentication among them."""
    routes = [r for router in (native.router, v2.router, hf.router) for r in router.routes if isinstance(r, APIRoute)]
    assert len(routes) > 20
    assert [r.path for r in routes if r.body_field is not None] == []


# --- 2. nesting is bounded before parsing ---------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def infer_json(data: Any = None, **extra: Any) -> dict[str, Any]:
    values = data if data is not None else [0.0] * PIXELS
    tensor = {"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE], "data": values}
    return {"inputs": [tensor], **extra}


@pytest.mark.parametrize(
    ("text", "deeper"),
    [
        (b"{}", False),
        (b'{"a": [1, {"b": []}]}', False),
        (b"[" * 33 + b"]" * 33, True),
        (b"[]" * 1000, False),  # many openers, never more than one level
        (b'["' + b"[" * 40 + b'"]', False),  # brackets inside a string do not count
        (b'["\\\\"' + b"[" * 40, True),  # an escaped backslash ends before the closing quote: these count
        (b'["\\"' + b"[" * 40 + b'"]', False),  # an escaped quote does not end the string
    ],
)
def test_nesting_is_counted_on_brackets_outside_strings(text: bytes, deeper: bool) -> None:
    assert nests_deeper_than(text, 32) is deeper


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param(INFER, DEEP, id="v2-body"),
        pytest.param(INFER, json.dumps(infer_json(parameters={"x": 0})).replace("0}", DEEP + "}"), id="v2-parameters"),
        pytest.param(INFER, json.dumps(infer_json(id="X")).replace('"X"', DEEP), id="v2-id"),
        pytest.param("/", '{"inputs": ' + DEEP + "}", id="hf"),
    ],
)
def test_deeply_nested_json_is_a_400_naming_the_limit(edge: ServerProcess, log_mark: int, path: str, body: str) -> None:
    response = httpx.post(
        f"{edge.url}{path}", content=body.encode(), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert "nests deeper than 32 levels" in plain_error(response, 400)
    assert_clean_log(edge, log_mark)


# --- 3. pixels are checked before the queue -------------------------------------------------------------------


def json_pixels_with(bad: str) -> bytes:
    """An infer body whose pixel element 5 is the JSON text ``bad`` (NaN, 1e400 …: what json.dumps cannot write)."""
    values = ["0.5"] * PIXELS
    values[5] = bad
    body = json.dumps(infer_json(data=["SLOT"]))
    return body.replace('["SLOT"]', "[" + ",".join(values) + "]").encode()


def binary_pixels_with(datatype: str, bad: float) -> tuple[bytes, int]:
    dtype = {"FP32": "<f4", "FP16": "<f2"}[datatype]
    values = np.full(PIXELS, 0.5, dtype=dtype)
    values[5] = bad
    raw = values.tobytes()
    header = {
        "inputs": [
            {
                "name": "pixel_values",
                "datatype": datatype,
                "shape": [1, 3, SIZE, SIZE],
                "parameters": {"binary_data_size": len(raw)},
            }
        ]
    }
    head = json.dumps(header).encode()
    return head + raw, len(head)


@pytest.mark.parametrize(
    "bad", ["NaN", "Infinity", "-Infinity", "null", "1" + "0" * 400, "1e400", "1e30", "true", '"0.5"']
)
def test_json_pixels_that_are_not_finite_numbers_are_a_400_naming_the_element(
    edge: ServerProcess, log_mark: int, bad: str
) -> None:
    response = httpx.post(
        f"{edge.url}{INFER}", content=json_pixels_with(bad), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert "input 'pixel_values' element 5" in plain_error(response, 400)
    assert_clean_log(edge, log_mark)


@pytest.mark.parametrize(
    ("datatype", "bad"),
    [("FP16", float("nan")), ("FP32", float("inf")), ("FP32", -1e30)],
    ids=["fp16-nan", "fp32-inf", "fp32-huge"],
)
def test_binary_pixels_that_are_not_finite_are_a_400(
    edge: ServerProcess, log_mark: int, datatype: str, bad: float
) -> None:
    body, header_length = binary_pixels_with(datatype, bad)
    response = httpx.post(
        f"{edge.url}{INFER}",
        content=body,
        headers={
            **AUTH,
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(header_length),
        },
    )
    assert "input 'pixel_values' element 5" in plain_error(response, 400)
    assert_clean_log(edge, log_mark)


def test_finite_pixels_still_classify(edge: ServerProcess) -> None:
    response = httpx.post(f"{edge.url}{INFER}", json=infer_json(data=[-2.0, 2.5] * (PIXELS // 2)), headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [1, 10]


# --- 4. echoed client text always encodes ---------------------------------------------------------------------


def test_dumps_repairs_lone_surrogates_in_keys_and_values_and_leaves_pairs_alone() -> None:
    encoded = dumps({"id\udc80": ["a\ud800b", {"k": "\ud83d\ude00"}], "n": 1})
    assert json.loads(encoded) == {"id\ufffd": ["a\ufffdb", {"k": "\U0001f600"}], "n": 1}


def test_a_lone_surrogate_in_an_echoed_id_is_replaced_not_a_500(edge: ServerProcess) -> None:
    body = json.dumps(infer_json(id="req-\ud800"))  # ensure_ascii: the surrogate travels as the escape \ud800
    assert "\\ud800" in body
    response = httpx.post(f"{edge.url}{INFER}", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "req-\ufffd"


def test_a_lone_surrogate_echoed_in_an_error_message_is_replaced(edge: ServerProcess, log_mark: int) -> None:
    body = infer_json()
    body["inputs"][0]["datatype"] = "\udc80"
    response = httpx.post(
        f"{edge.url}{INFER}", content=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert "\ufffd" in plain_error(response, 400)
    assert_clean_log(edge, log_mark)


# --- 6. no stage leaves a future unobserved -------------------------------------------------------------------


def test_a_request_past_its_deadline_before_queueing_is_504_with_nothing_unobserved(
    edge: ServerProcess, log_mark: int
) -> None:
    for _ in range(3):
        response = httpx.post(f"{edge.url}{INFER}", json=infer_json(parameters={"timeout": 1}), headers=AUTH)
        assert plain_error(response, 504)
    assert_clean_log(edge, log_mark)


# --- choices: what is open, what an empty or refused choice means ------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v2", "/v2/health/ready", "/openapi.json", "/docs"])
def test_probes_and_the_api_description_stay_open_with_keys(edge: ServerProcess, path: str) -> None:
    assert httpx.get(f"{edge.url}{path}").status_code == 200


def test_an_empty_outputs_list_is_a_400(edge: ServerProcess) -> None:
    response = httpx.post(f"{edge.url}{INFER}", json=infer_json(outputs=[]), headers=AUTH)
    assert "'outputs' is empty" in plain_error(response, 400)


def test_octet_stream_given_q_0_is_refused_and_json_answered(edge: ServerProcess) -> None:
    files = [("file", ("a.png", image_bytes(), "image/png"))]
    for accept, raw in [("application/octet-stream;q=0, application/json", False), ("application/octet-stream", True)]:
        response = httpx.post(f"{edge.url}/embed", files=files, headers={**AUTH, "Accept": accept})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/octet-stream" if raw else "application/json")
