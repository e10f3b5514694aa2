"""Open Inference Protocol (KServe V2) request parsing and response building, as pure functions over bytes.

Covers the JSON body, Triton's binary tensor data extension (a JSON header of ``Inference-Header-Content-Length``
bytes, then each binary tensor's raw bytes in input order; BYTES elements each as a 4-byte little-endian length
then the bytes) and the classification extension (``"score:index:label"`` strings, highest first).
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.api import results
from service.api.pixels import check_pixels, pixels_from_json
from service.errors import BadRequest, TaskNotSupported, TooManyFiles
from service.http.json_body import loads_bounded
from service.http.responses import dumps

IMAGE_INPUT = "image"  # BYTES [N] or [N, 1]: encoded images (JPEG, PNG, ...)
PIXELS_INPUT = "pixel_values"  # FP32 or FP16 [N, 3, H, W]: preprocessed pixels
CLASSIFICATION_OUTPUTS = ("probabilities", "logits")  # FP32 [N, num_labels]
EMBEDDING_OUTPUT = "embedding"  # FP32 [N, hidden_size]: as POST /embed gives it
OUTPUTS = (*CLASSIFICATION_OUTPUTS, EMBEDDING_OUTPUT)
_PIXEL_DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0  # top-K as "score:index:label" strings; 0: the tensor itself
    pooling: str | None = None  # the embedding's pooling (the model's natural one when None)
    normalize: bool = False  # the embedding scaled to unit length


@dataclass
class ParsedInferRequest:
    """A parsed infer request: exactly one of ``images`` and ``pixels`` is set."""

    id: str | None
    outputs: list[RequestedOutput]
    timeout_s: float | None = None
    images: list[bytes] | None = None
    pixels: Tensor | None = None  # float32 [N, 3, H, W]


@dataclass
class InputTensor:
    """One input as any transport carries it: JSON ``data``, ``raw`` bytes, or BYTES ``elements`` already split."""

    name: str
    datatype: str
    shape: list[int]
    data: Any = None
    raw: bytes | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    elements: list[bytes] | None = None


def parse_infer_request(
    body: bytes, header_length: int | None, *, input_size: tuple[int, int], max_elements: int,
    offered: Sequence[str] = OUTPUTS,
) -> ParsedInferRequest:  # fmt: skip
    """Parse a whole infer request body; 400 naming the problem, 413 over ``max_elements`` images. ``offered``: the
    outputs the model gives (a model without a classification head gives only the embedding)."""
    header_bytes, binary = _split(body, header_length)
    header = loads_bounded(header_bytes, "the inference request header")
    if not isinstance(header, dict):
        raise BadRequest("the inference request must be a JSON object")
    params = _object(header.get("parameters"), "parameters")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest(f"'inputs' must be a non-empty list; send one of {IMAGE_INPUT!r} or {PIXELS_INPUT!r}")
    inputs = [_input(x, i) for i, x in enumerate(raw_inputs)]
    _attach_binary(inputs, binary)
    return infer_request(
        request_id,
        params,
        inputs,
        header.get("outputs"),
        input_size=input_size,
        max_elements=max_elements,
        offered=offered,
    )


def infer_request(
    request_id: str | None, params: dict[str, Any], inputs: list[InputTensor], raw_outputs: Any, *,
    input_size: tuple[int, int], max_elements: int, offered: Sequence[str] = OUTPUTS,
) -> ParsedInferRequest:  # fmt: skip
    """The request from its parts, whichever transport carried them (REST's JSON and binary data, gRPC's
    messages): one input, ``image`` or ``pixel_values``; ``raw_outputs`` as JSON's ``outputs`` list."""
    if len(inputs) != 1:
        raise BadRequest(f"send exactly one input, {IMAGE_INPUT!r} or {PIXELS_INPUT!r}; got {len(inputs)}")
    request = ParsedInferRequest(
        request_id, _outputs(raw_outputs, _flag(params, "binary_data_output"), offered), _timeout(params)
    )
    tensor = inputs[0]
    if tensor.name == IMAGE_INPUT:
        request.images = _images(tensor, max_elements)
    elif tensor.name == PIXELS_INPUT:
        request.pixels = _pixels(tensor, input_size, max_elements)
    else:
        raise BadRequest(f"unknown input {tensor.name!r}; this model takes {IMAGE_INPUT!r} or {PIXELS_INPUT!r}")
    return request


def _split(body: bytes, header_length: int | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if header_length > len(body):
        raise BadRequest(f"Inference-Header-Content-Length is {header_length} but the body has only {len(body)} bytes")
    return body[:header_length], body[header_length:]


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"'{where}' must be a JSON object")
    return value


def _flag(params: dict[str, Any], name: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter {name!r} must be true or false")
    return value


def _timeout(params: dict[str, Any]) -> float | None:
    """Triton's ``timeout`` parameter is in microseconds; 0, as in Triton, sets none of its own."""
    value = params.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise BadRequest(f"parameter 'timeout' must be a non-negative number of microseconds, not {value!r}")
    return float(value) / 1e6 if value else None


def _input(raw: Any, index: int) -> InputTensor:
    if not isinstance(raw, dict):
        raise BadRequest(f"inputs[{index}] must be a JSON object")
    name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise BadRequest(f"inputs[{index}] needs a string 'name' and 'datatype'")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r}: 'shape' must be a list of non-negative integers")
    params = _object(raw.get("parameters"), f"inputs[{index}].parameters")
    return InputTensor(name, datatype.upper(), shape, raw.get("data"), parameters=params)


def _attach_binary(inputs: list[InputTensor], binary: bytes) -> None:
    """Give each input with ``binary_data_size`` its slice of the bytes after the header, in input order."""
    offset = 0
    for tensor in inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(f"input {tensor.name!r}: 'binary_data_size' must be a non-negative integer")
        if offset + size > len(binary):
            raise BadRequest(
                f"input {tensor.name!r}: binary_data_size {size} runs past the end of the body "
                f"({len(binary) - offset} binary bytes left)"
            )
        if tensor.data is not None:
            raise BadRequest(f"input {tensor.name!r} has both 'data' and 'binary_data_size'")
        tensor.raw = binary[offset : offset + size]
        offset += size
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes after the inference header belong to no input")


def _batch_of(tensor: InputTensor, max_elements: int) -> int:
    n = tensor.shape[0] if tensor.shape else 0
    if n > max_elements:
        raise TooManyFiles(f"input {tensor.name!r} holds {n} images; at most {max_elements} per request")
    if n == 0:
        raise BadRequest(f"input {tensor.name!r} holds no images")
    return n


def _images(tensor: InputTensor, max_elements: int) -> list[bytes]:
    if tensor.datatype != "BYTES":
        raise BadRequest(f"input {IMAGE_INPUT!r} must be BYTES (encoded images), not {tensor.datatype}")
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise BadRequest(f"input {IMAGE_INPUT!r} must have shape [N] or [N, 1], not {tensor.shape}")
    n = _batch_of(tensor, max_elements)
    if tensor.elements is not None:
        images = tensor.elements
    elif tensor.raw is not None:
        images = split_bytes_elements(tensor.raw, n)
    else:
        images = [_b64(s, i) for i, s in enumerate(_flat(tensor.data, IMAGE_INPUT))]
    if len(images) != n:
        raise BadRequest(f"input {IMAGE_INPUT!r} has shape {tensor.shape} but holds {len(images)} elements")
    return images


def split_bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """BYTES elements, each a 4-byte little-endian length then its bytes. A single element may also come as its
    bare bytes (some clients send ``binary_data_size`` without the length prefix)."""
    if count == 1 and not (len(raw) >= 4 and _LENGTH.unpack_from(raw)[0] == len(raw) - 4):
        return [raw]
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequest(f"BYTES element {len(elements)}: truncated 4-byte length prefix at byte {offset}")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadRequest(
                f"BYTES element {len(elements)}: length {length} runs past the end of its tensor "
                f"({len(raw) - offset} bytes left)"
            )
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def _flat(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r} needs 'data' (a list) or binary data ('binary_data_size')")
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _b64(value: Any, index: int) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"input {IMAGE_INPUT!r} element {index}: JSON data must be base64 strings")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"input {IMAGE_INPUT!r} element {index} is not valid base64: {e}") from e


def _pixels(tensor: InputTensor, size: tuple[int, int], max_elements: int) -> Tensor:
    dtype = _PIXEL_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise BadRequest(f"input {PIXELS_INPUT!r} must be FP32 or FP16, not {tensor.datatype}")
    h, w = size
    if len(tensor.shape) != 4 or tensor.shape[1:] != [3, h, w]:
        raise BadRequest(f"input {PIXELS_INPUT!r} must have shape [N, 3, {h}, {w}] for this model, not {tensor.shape}")
    n = _batch_of(tensor, max_elements)
    count = math.prod(tensor.shape)
    if tensor.raw is not None:
        if len(tensor.raw) != count * dtype.itemsize:
            raise BadRequest(
                f"input {PIXELS_INPUT!r}: shape {tensor.shape} of {tensor.datatype} needs {count * dtype.itemsize} "
                f"bytes, got {len(tensor.raw)}"
            )
        array = check_pixels(np.frombuffer(tensor.raw, dtype=dtype), PIXELS_INPUT)
    else:
        array = pixels_from_json(_flat(tensor.data, PIXELS_INPUT), PIXELS_INPUT)
        if array.size != count:
            raise BadRequest(f"input {PIXELS_INPUT!r} has shape {tensor.shape} but holds {array.size} values")
    array = array.astype(np.float32, copy=False)
    if not array.flags.writeable:  # float32 read in place from the request's bytes: torch tensors need their own
        array = array.copy()
    return torch.from_numpy(array).reshape(n, 3, h, w)


def _outputs(raw: Any, binary_default: bool, offered: Sequence[str]) -> list[RequestedOutput]:
    """The requested outputs; none requested means the classification outputs of a classifier (the embedding is
    on request, keeping default answers as small as they were), and the embedding of a model without a head."""
    if raw is None:
        defaults = [name for name in offered if name in CLASSIFICATION_OUTPUTS] or list(offered)
        return [RequestedOutput(name, binary_default) for name in defaults]
    if not isinstance(raw, list):
        raise BadRequest("'outputs' must be a list")
    if not raw:  # an answer with nothing in it is never what a client meant
        raise BadRequest(f"'outputs' is empty: name at least one of {', '.join(map(repr, offered))}, or leave it out")
    requested: list[RequestedOutput] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"outputs[{i}] needs a string 'name'")
        name = item["name"]
        if name not in OUTPUTS:
            raise BadRequest(f"unknown output {name!r}; this model gives {', '.join(map(repr, offered))}")
        if name not in offered:
            raise TaskNotSupported(
                f"output {name!r} needs a classification head, which this model has not; it gives "
                f"{', '.join(map(repr, offered))}"
            )
        params = _object(item.get("parameters"), f"outputs[{i}].parameters")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise BadRequest(f"output {name!r}: 'binary_data' must be true or false")
        k = params.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise BadRequest(f"output {name!r}: 'classification' must be a non-negative integer")
        pooling, normalize = params.get("pooling"), params.get("normalize", False)
        if name == EMBEDDING_OUTPUT:
            if k:
                raise BadRequest(f"output {name!r} is a vector, not class scores: 'classification' does not apply")
            if any(r.name == name for r in requested):
                raise BadRequest(f"output {name!r} is requested twice")
            if pooling is not None and not isinstance(pooling, str):
                raise BadRequest(f"output {name!r}: 'pooling' must be a pooling name")
            if not isinstance(normalize, bool):
                raise BadRequest(f"output {name!r}: 'normalize' must be true or false")
        requested.append(RequestedOutput(name, binary, k, pooling, normalize))
    return requested


def embedding_output(requested: Sequence[RequestedOutput]) -> RequestedOutput | None:
    return next((o for o in requested if o.name == EMBEDDING_OUTPUT), None)


def classification_strings(values: Tensor, k: int, labels: Sequence[str]) -> list[list[str]]:
    """The classification extension: per row the top ``k`` (capped at the labels) as ``"score:index:label"``."""
    return [[f"{c.score:f}:{c.index}:{c.label}" for c in row] for row in results.top_k(values, k, labels)]


def join_bytes_elements(values: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(v)) + v for v in values)


def build_infer_response(
    model: str, version: str, request_id: str | None, outputs: list[RequestedOutput], tensors: dict[str, Tensor],
    labels: Sequence[str],
) -> tuple[bytes, int | None]:  # fmt: skip
    """The response body, and the JSON header's length when binary outputs follow it (else None)."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in outputs:
        values = tensors[out.name]
        entry: dict[str, Any] = {"name": out.name}
        if out.classification:
            strings = classification_strings(values, out.classification, labels)
            entry.update(datatype="BYTES", shape=[len(strings), len(strings[0]) if strings else 0])
            raw = join_bytes_elements([s.encode() for row in strings for s in row]) if out.binary else None
            data: list[Any] = [s for row in strings for s in row]
        else:
            entry.update(datatype="FP32", shape=list(values.shape))
            raw = values.numpy().astype("<f4").tobytes() if out.binary else None
            data = values.flatten().tolist()
        if raw is not None:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = data
        entries.append(entry)
    header: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        header["id"] = request_id
    header["outputs"] = entries
    encoded = dumps(header)
    if not chunks:
        return encoded, None
    return encoded + b"".join(chunks), len(encoded)
