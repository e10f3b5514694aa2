"""ModelInferRequest → the protocol's parsed request, and outputs → ModelInferResponse: the gRPC half of the V2
codec (``service.api.v2_codec``), which does the checking; pure functions, no server."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from service.api.grpc import inference_pb2 as pb
from service.api.v2_codec import (
    InputTensor,
    ParsedInferRequest,
    RequestedOutput,
    classification_strings,
    infer_request,
    join_bytes_elements,
)
from service.errors import BadRequest


def parameter_value(parameter: pb.InferParameter) -> Any:
    """The Python value of one parameter, whichever of the oneof's fields holds it (None when unset)."""
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {name: parameter_value(value) for name, value in params.items()}


def parse_request(
    request: pb.ModelInferRequest, *, input_size: tuple[int, int], max_elements: int, offered: Sequence[str]
) -> ParsedInferRequest:
    """The same request the REST route parses: images from ``raw_input_contents`` (4-byte length-prefixed BYTES
    elements) or ``contents.bytes_contents``, pixels (FP32/FP16) raw or in ``contents.fp32_contents``."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: one per input")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        parsed = InputTensor(
            tensor.name, tensor.datatype.upper(), list(tensor.shape), parameters=parameters(tensor.parameters)
        )
        if any(d < 0 for d in parsed.shape):
            raise BadRequest(f"input {tensor.name!r}: 'shape' must be non-negative, not {parsed.shape}")
        if raw:
            if tensor.HasField("contents"):
                raise BadRequest(f"input {tensor.name!r} has both contents and raw_input_contents")
            parsed.raw = raw[i]
        elif parsed.datatype == "BYTES":
            parsed.elements = list(tensor.contents.bytes_contents)
        elif parsed.datatype == "FP32":
            parsed.raw = np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()
        else:
            raise BadRequest(f"input {tensor.name!r} ({parsed.datatype}) needs raw_input_contents")
        inputs.append(parsed)
    outputs = [{"name": o.name, "parameters": parameters(o.parameters)} for o in request.outputs] or None
    return infer_request(
        request.id or None, parameters(request.parameters), inputs, outputs, input_size=input_size,
        max_elements=max_elements, offered=offered,
    )  # fmt: skip


def build_response(
    model: str, version: str, request_id: str | None, outputs: Sequence[RequestedOutput], tensors: Mapping[str, Tensor],
    labels: Sequence[str],
) -> pb.ModelInferResponse:  # fmt: skip
    """Every output in ``raw_output_contents`` (as tritonclient reads them): FP32 little-endian, or the
    classification extension's ``"score:index:label"`` strings as BYTES elements."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id or "")
    for out in outputs:
        values = tensors[out.name]
        if out.classification:
            strings = classification_strings(values, out.classification, labels)
            shape = [len(strings), len(strings[0]) if strings else 0]
            raw = join_bytes_elements([s.encode() for row in strings for s in row])
            response.outputs.add(name=out.name, datatype="BYTES", shape=shape)
        else:
            raw = values.numpy().astype("<f4").tobytes()
            response.outputs.add(name=out.name, datatype="FP32", shape=list(values.shape))
        response.raw_output_contents.append(raw)
    return response
