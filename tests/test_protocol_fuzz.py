"""Fuzzing the Open Inference Protocol and Hugging Face routes of one real server process: requests generated from
its own OpenAPI schema (schemathesis), and binary infer requests built to be almost right (hypothesis). No answer
is a 5xx (a 504 for a passed deadline aside), and every error is ``{"error": "<message>"}``."""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import Case
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import Settings
from tests.serving import SMALL_UPLOADS, ServerProcess, SharedServers

MAX_FILES = int(SMALL_UPLOADS["DEIT_MAX_FILES"])
MAX_UPLOAD_BYTES = int(SMALL_UPLOADS["DEIT_MAX_UPLOAD_BYTES"])
PROTOCOL_PATHS = r"^/($|v2|models/)"


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


JPEG = _jpeg(0)


@pytest.fixture(scope="module")
def server(tiny_store: Path, servers: SharedServers) -> ServerProcess:
    return servers.get(tiny_store, SMALL_UPLOADS)


def check_answer(status: int, content_type: str, content: bytes, what: object) -> None:
    """No server error but a passed deadline; every error a JSON object with one string ``error``."""
    assert status < 500 or status == 504, f"{status} for {what}: {content[:500]!r}"
    if status >= 400:
        assert content_type.startswith("application/json"), (status, content_type, what)
        body = json.loads(content)
        assert isinstance(body, dict), (status, body, what)
        assert set(body) == {"error"}, (status, body, what)
        assert isinstance(body["error"], str), (status, body, what)
        assert body["error"], (status, body, what)


# The document the app factory builds, the one the server serves (checked below): collected before any server runs.
SPEC = create_app(Settings.model_validate({})).openapi()
schema = schemathesis.openapi.from_dict(SPEC).include(path_regex=PROTOCOL_PATHS)


def test_the_server_serves_the_fuzzed_schema(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/openapi.json", timeout=10).json() == SPEC


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_routes_from_the_openapi_schema(case: Case[Any], server: ServerProcess) -> None:
    response = case.call(base_url=server.url, timeout=30)
    [content_type] = response.headers.get("content-type", [""])
    what = f"{case.method} {case.formatted_path} {case.headers} {case.query} {case.body!r:.300}"
    check_answer(response.status_code, content_type, response.content, what)
    # the answer is what /openapi.json documents: status code, content type, and (for JSON) its schema
    case.validate_response(
        response, checks=[status_code_conformance, content_type_conformance, response_schema_conformance]
    )


@pytest.mark.parametrize("suffix", ["", "/ready", "/config"])
@pytest.mark.parametrize("version", ["²", "1¹", "٣", "-1", "01x"])
def test_a_version_that_is_not_a_plain_number_is_not_found(server: ServerProcess, version: str, suffix: str) -> None:
    """Found by the fuzzer: "²" passes ``str.isdigit`` but not ``int``; such a version is a 404, not a 500."""
    response = httpx.get(f"{server.url}/v2/models/tiny/versions/{version}{suffix}", timeout=10)
    check_answer(response.status_code, response.headers["content-type"], response.content, version)
    assert response.status_code == 404, response.text


# --- binary infer requests: a JSON header, binary tensor data, and a declared header length -------------------------

_NAMES = st.sampled_from(["image", "pixel_values", "logits", ""])
_DATATYPES = st.sampled_from(["BYTES", "FP32", "FP16", "INT8", "bytes", ""])
_DIMS = st.one_of(st.integers(0, 5), st.sampled_from([32, -1, 2**31, 2**64]))
_SHAPES = st.one_of(st.lists(_DIMS, max_size=5), st.sampled_from([[1], [1, 1], [1, 3, 32, 32], [2**40, 3, 32, 32]]))
_SIZES = st.one_of(st.integers(-2, 64), st.sampled_from([len(JPEG), len(JPEG) + 4, 2**63, True, "7", None, 1.5]))
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8), lambda c: (
    st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3)
), max_leaves=6)  # fmt: skip


@st.composite
def _tensor_bytes(draw: st.DrawFn) -> bytes:
    """Bytes of an input: the JPEG with or without its length prefix, floats, or noise."""
    kind = draw(st.sampled_from(["jpeg", "prefixed", "floats", "noise", "empty"]))
    if kind == "jpeg":
        return JPEG
    if kind == "prefixed":
        count = draw(st.integers(1, 3))
        return b"".join(struct.pack("<I", len(JPEG) + draw(st.integers(-2, 2))) + JPEG for _ in range(count))
    if kind == "floats":
        return np.full(draw(st.integers(0, 3 * 32 * 32 + 2)), draw(st.floats(width=32)), dtype="<f4").tobytes()
    if kind == "noise":
        return draw(st.binary(max_size=256))
    return b""


# Not byte counts; b"\xb2" and b"1\xb9" read as "²" and "1¹", which pass str.isdigit but not int().
ODD_LENGTHS: list[str | bytes] = ["", "+12", "0x10", "-0", "1e3", "1_0", "00", "٣".encode(), b"\xb2", b"1\xb9"]


@st.composite
def binary_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str | bytes], str]:
    inputs: list[Any] = []
    binary = b""
    for _ in range(draw(st.integers(0, 2))):
        raw = draw(_tensor_bytes())
        size = draw(st.one_of(st.just(len(raw)), _SIZES))
        tensor: dict[str, Any] = {"name": draw(_NAMES), "datatype": draw(_DATATYPES), "shape": draw(_SHAPES)}
        tensor["parameters"] = draw(st.one_of(st.just({"binary_data_size": size}), _JSON))
        if draw(st.booleans()):
            tensor["data"] = draw(st.one_of(st.just([base64.b64encode(JPEG).decode()]), _JSON))
        inputs.append(tensor)
        binary += raw
    header: dict[str, Any] = {"inputs": inputs}
    if draw(st.booleans()):
        header["outputs"] = draw(
            st.one_of(
                st.lists(
                    st.fixed_dictionaries(
                        {"name": st.sampled_from(["probabilities", "logits", "x"])},
                        optional={"parameters": st.one_of(_JSON, st.fixed_dictionaries({}, optional={
                            "binary_data": st.one_of(st.booleans(), _JSON),
                            "classification": st.one_of(st.integers(-1, 20), _JSON),
                        }))},
                    ), max_size=3,
                ),
                _JSON,
            )
        )  # fmt: skip
    if draw(st.booleans()):
        header["parameters"] = draw(
            st.one_of(
                _JSON,
                st.fixed_dictionaries({}, optional={
                    "binary_data_output": st.one_of(st.booleans(), _JSON),
                    "timeout": st.one_of(st.integers(-1, 10**12), st.floats(), _JSON),
                }),
            )
        )  # fmt: skip
    # NaN and Infinity as Python writes them: json.loads (the server's parser) reads them back
    encoded = json.dumps(header).encode() if draw(st.booleans()) else draw(st.sampled_from([b"{}", b"[", b"\xff"]))
    body = encoded + binary
    length = draw(
        st.one_of(
            st.just(str(len(encoded))),
            st.integers(-3, 3).map(lambda d: str(len(encoded) + d)),
            st.integers(0, 2**70).map(str),
            st.sampled_from(ODD_LENGTHS),
        )
    )
    # bytes go on the wire as they are: a server reads header values as latin-1, where b"\xb2" is a digit ("²")
    headers: dict[str, str | bytes] = {"Inference-Header-Content-Length": length}
    if draw(st.booleans()):
        headers["X-Request-Timeout"] = draw(st.sampled_from(["0.000001", "abc", "-1", "nan", "inf", "1e309", "5"]))
    path = draw(st.sampled_from(["/v2/models/tiny/infer", "/v2/models/tiny/versions/1/infer", "/v2/models/x/infer"]))
    return body, headers, path


@given(request=binary_requests())
@example(request=(b'{"inputs": []}', {"Inference-Header-Content-Length": b"\xb2"}, "/v2/models/tiny/infer"))
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_binary_infer_requests(server: ServerProcess, request: tuple[bytes, dict[str, str | bytes], str]) -> None:
    body, headers, path = request
    wire = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in headers.items()}
    response = httpx.post(f"{server.url}{path}", content=body, headers=wire, timeout=30)
    check_answer(
        response.status_code, response.headers.get("content-type", ""), response.content, (path, headers, body[:300])
    )
    if response.status_code == 200:
        length = response.headers.get("inference-header-content-length")
        header = json.loads(response.content[: int(length)] if length else response.content)
        assert header["model_name"] == "tiny"
        assert header["outputs"]


@st.composite
def hf_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str], str]:
    image = base64.b64encode(JPEG).decode()
    inputs = draw(st.one_of(st.just(image), st.lists(st.just(image), max_size=6), _JSON, st.text(max_size=20)))
    payload: dict[str, Any] = {"inputs": inputs}
    if draw(st.booleans()):
        payload["parameters"] = draw(st.one_of(_JSON, st.fixed_dictionaries({}, optional={
            "top_k": st.one_of(st.integers(-1, 2**65), _JSON),
            "function_to_apply": st.one_of(st.sampled_from(["softmax", "sigmoid", "none", "tanh"]), _JSON),
        })))  # fmt: skip
    body = draw(st.one_of(st.just(json.dumps(payload).encode()), st.just(JPEG), st.binary(max_size=64)))
    content_type = draw(st.sampled_from(["application/json", "image/jpeg", "", "text/plain", "application/json;x"]))
    path = draw(st.sampled_from(["/", "/models/tiny", "/models/nope"]))
    return body, {"Content-Type": content_type} if content_type else {}, path


@given(request=hf_requests())
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_hugging_face_requests(server: ServerProcess, request: tuple[bytes, dict[str, str], str]) -> None:
    body, headers, path = request
    response = httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=30)
    check_answer(
        response.status_code, response.headers.get("content-type", ""), response.content, (path, headers, body[:300])
    )
