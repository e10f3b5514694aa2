"""Open Inference Protocol (KServe V2 / Triton REST) endpoints over the same engine as POST /classify.

Errors on these paths are ``{"error": "<message>"}`` (the protocol's shape; see service/app.py), with the status
codes of the native API.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from fastapi import APIRouter, Header, Request, Response

from service import __version__
from service.deps import AppState, State, admit
from service.deps import Authorized as AuthorizedDep
from service.errors import BadRequest, ModelNotFound, NotReady, UnsupportedMediaType
from service.lifecycle import Phase
from service.middleware import request_arrival
from service.protocols.v2_codec import IMAGE_INPUT, OUTPUTS, PIXELS_INPUT, build_infer_response, parse_infer_request
from service.served import EncodedImage, ServedModel

VERSION = "1"  # every model has one version
PLATFORM = "pytorch_deit"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration")
HEADER_LENGTH = "inference-header-content-length"


# Full paths on one router, no prefix or nested router: the metrics label a request by its route's own path.
router = APIRouter(tags=["Open Inference Protocol"])
Authorized = [AuthorizedDep]


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "deit-serve", "version": __version__, "extensions": list(EXTENSIONS)}


@router.get("/v2/health/live", summary="Liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", summary="Readiness: every model loaded and warm, not draining")
async def ready(state: State) -> dict[str, bool]:
    if state.lifecycle.phase is not Phase.READY:
        raise NotReady(f"not ready: {state.lifecycle.phase.value}")
    return {"ready": True}


def _model(state: AppState, name: str, version: str | None) -> ServedModel:
    served = state.store.get(name)
    if version is not None and version != VERSION:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; available: {VERSION}")
    return served


def _metadata(served: ServedModel) -> dict[str, Any]:
    h, w = served.preprocessor.cfg.output_size
    labels = len(served.labels)
    return {
        "name": served.name,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1, 1]},
            {"name": PIXELS_INPUT, "datatype": "FP32", "shape": [-1, 3, h, w]},
        ],
        "outputs": [{"name": name, "datatype": "FP32", "shape": [-1, labels]} for name in OUTPUTS],
    }


def _config(served: ServedModel, max_batch_size: int) -> dict[str, Any]:
    """Triton's model configuration, as far as clients (perf_analyzer) read it: batch dim left out of ``dims``."""
    h, w = served.preprocessor.cfg.output_size
    labels = len(served.labels)
    return {
        "name": served.name,
        "platform": PLATFORM,
        "backend": "pytorch",
        "max_batch_size": max_batch_size,
        "input": [
            {"name": IMAGE_INPUT, "data_type": "TYPE_STRING", "dims": [1], "optional": True},
            {
                "name": PIXELS_INPUT,
                "data_type": "TYPE_FP32",
                "format": "FORMAT_NCHW",
                "dims": [3, h, w],
                "optional": True,
            },
        ],
        "output": [{"name": name, "data_type": "TYPE_FP32", "dims": [labels]} for name in OUTPUTS],
        "dynamic_batching": {},
        "version_policy": {"specific": {"versions": [int(VERSION)]}},
    }


@router.get("/v2/models/{model_name}", summary="Model metadata", dependencies=Authorized)
@router.get(
    "/v2/models/{model_name}/versions/{model_version}", summary="Model metadata of one version", dependencies=Authorized
)
async def model_metadata(state: State, model_name: str, model_version: str | None = None) -> dict[str, Any]:
    return _metadata(_model(state, model_name, model_version))


@router.get("/v2/models/{model_name}/ready", summary="Model readiness", dependencies=Authorized)
@router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready",
    summary="Model readiness of one version",
    dependencies=Authorized,
)
async def model_ready(state: State, model_name: str, model_version: str | None = None) -> dict[str, Any]:
    served = _model(state, model_name, model_version)
    if not served.ready or state.lifecycle.phase is not Phase.READY:
        raise NotReady(f"model {served.name!r} is not ready: {state.lifecycle.phase.value}")
    return {"name": served.name, "ready": True}


@router.get("/v2/models/{model_name}/config", summary="Model configuration (Triton)", dependencies=Authorized)
@router.get(
    "/v2/models/{model_name}/versions/{model_version}/config",
    summary="Model configuration of one version",
    dependencies=Authorized,
)
async def model_config(state: State, model_name: str, model_version: str | None = None) -> dict[str, Any]:
    return _config(_model(state, model_name, model_version), state.settings.max_batch_size)


@router.post("/v2/models/{model_name}/infer", summary="Inference", dependencies=Authorized)
@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    summary="Inference on one version",
    dependencies=Authorized,
)
async def infer(
    request: Request,
    state: State,
    model_name: str,
    model_version: str | None = None,
    x_request_timeout: Annotated[float | None, Header(gt=0)] = None,
) -> Response:
    settings = state.settings
    state.lifecycle.check_accepting()
    served = _model(state, model_name, model_version)
    header_length = _header_length(request)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not accepted: send the request uncompressed")
    async with admit(request, state, served, x_request_timeout) as admitted:
        body = await admitted.body()
        parsed = await state.decode_pool.run(
            admitted.context,
            lambda: parse_infer_request(
                body, header_length, input_size=served.input_size, max_elements=settings.max_files
            ),
        )
        if parsed.timeout_s is not None:
            admitted.context.shorten(request_arrival(request) + parsed.timeout_s)
        if parsed.images is not None:
            logits = await admitted.logits([EncodedImage(f"image {i}", data) for i, data in enumerate(parsed.images)])
        else:
            assert parsed.pixels is not None
            logits = await admitted.logits(parsed.pixels)
    tensors = {"logits": logits, "probabilities": torch.softmax(logits, dim=-1)}
    content, json_length = build_infer_response(served.name, VERSION, parsed.id, parsed.outputs, tensors, served.labels)
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(json_length)}
    )


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise BadRequest(f"Inference-Header-Content-Length must be a byte count, not {value!r}")
    return int(value)
