"""Hugging Face image-classification API (what ``InferenceClient.image_classification`` calls) over the engine.

The body is the raw image (any Content-Type, or none), or JSON ``{"inputs": "<base64>", "parameters": {...}}``;
the answer is transformers' image-classification pipeline output, ``[{"label", "score"}, ...]`` highest first.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import APIRouter, Request, Response

from service.api import results
from service.api.admission import Authorized, State, TimeoutHeader, accepting_model, admit
from service.api.protocol_schemas import HFRequest, HFResponse, inline_schema
from service.api.schemas import PlainErrorBody
from service.engine.served import CLASSIFY
from service.errors import BadRequest, EmptyUpload, InvalidParameter, TooManyFiles
from service.http.responses import json_response
from service.images import EncodedImage

DEFAULT_TOP_K = 5  # the pipeline's default

router = APIRouter(tags=["Hugging Face API"])
_DESCRIPTION = (
    'Raw image body, or JSON `{"inputs": "<base64 image>", "parameters": {"top_k": K, '
    '"function_to_apply": "softmax"|"sigmoid"|"none"}}`. Answers `[{"label", "score"}]` highest first.'
)


_ROUTE: dict[str, Any] = {
    "dependencies": [Authorized],
    "description": _DESCRIPTION,
    "response_class": Response,
    "responses": {
        200: {"model": HFResponse, "description": "the classes, highest score first (a list per image for a list)"},
        **{code: {"model": PlainErrorBody} for code in (400, 401, 404, 408, 413, 415, 422, 499, 500, 503, 504)},
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline_schema(HFRequest)},
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}


@router.post("/", summary="Classify an image (Hugging Face API, default model)", **_ROUTE)
async def classify_default(request: Request, state: State, x_request_timeout: TimeoutHeader = None) -> Response:
    return await _classify(request, state, None, x_request_timeout)


@router.post("/models/{model_name}", summary="Classify an image (Hugging Face API)", **_ROUTE)
async def classify_named(
    request: Request, state: State, model_name: str, x_request_timeout: TimeoutHeader = None
) -> Response:
    return await _classify(request, state, model_name, x_request_timeout)


async def _classify(request: Request, state: State, model: str | None, timeout_s: float | None) -> Response:
    settings = state.settings
    served = accepting_model(state, model, task=CLASSIFY)
    async with admit(request, state, served, timeout_s) as admitted:
        body = await admitted.body()
        content_type = request.headers.get("content-type", "")
        # base64 of a large body: off the event loop
        images, params, batched = await state.decode_pool.run(
            admitted.context, lambda: parse_request(body, content_type, settings.max_files)
        )
        k, function = _parameters(params, len(served.labels))
        inference = await admitted.infer([EncodedImage(f"image {i}", data) for i, data in enumerate(images)])
    ranked = results.top_k(results.scores(results.logits(inference), function), k, served.labels)
    answer = [[{"label": c.label, "score": c.score} for c in classes] for classes in ranked]
    return json_response(answer if batched else answer[0])


def parse_request(body: bytes, content_type: str, max_images: int) -> tuple[list[bytes], dict[str, Any], bool]:
    """The images, the parameters, and whether ``inputs`` was a list (then the answer is a list per image)."""
    if not body:
        raise EmptyUpload("empty body: send an image, or JSON with a base64 image in 'inputs'")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not (not media_type and body.lstrip()[:1] == b"{"):
        return [body], {}, False
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from e
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequest("a JSON body must be an object with 'inputs' (a base64-encoded image)")
    params = payload.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be a JSON object")
    inputs = payload["inputs"]
    batched = isinstance(inputs, list)
    values = inputs if batched else [inputs]
    if len(values) > max_images:
        raise TooManyFiles(f"{len(values)} images in one request; at most {max_images}")
    if not values:
        raise EmptyUpload("'inputs' is an empty list")
    return [_b64_image(v, i) for i, v in enumerate(values)], params, batched


def _b64_image(value: Any, index: int) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"inputs[{index}] must be a base64-encoded image string")
    if value.startswith(("http://", "https://")):
        raise BadRequest(f"inputs[{index}] is a URL; the server does not fetch URLs: send the image itself")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]  # a data URI: its payload
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"inputs[{index}] is not valid base64: {e}") from e


def _parameters(params: dict[str, Any], num_labels: int) -> tuple[int, str]:
    """``top_k`` (default 5, capped at the labels, as the pipeline does) and ``function_to_apply``."""
    k = params.get("top_k")
    if k is None:
        k = DEFAULT_TOP_K
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidParameter(f"top_k must be a positive integer, not {k!r}")
    function = params.get("function_to_apply") or "softmax"
    if function not in results.SCORE_FUNCTIONS:
        raise InvalidParameter(
            f"function_to_apply must be one of {', '.join(results.SCORE_FUNCTIONS)}, not {function!r}"
        )
    return min(k, num_labels), str(function)
