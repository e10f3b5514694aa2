"""Open Inference Protocol (KServe V2 / Triton REST) endpoints over the same engine as POST /classify.

Errors on these paths are ``{"error": "<message>"}`` (the protocol's shape; see service/app.py), with the status
codes of the native API.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Body, Header, Request, Response
from torch import Tensor

from service import __version__
from service.deps import AppState, State, admit
from service.deps import Authorized as AuthorizedDep
from service.errors import BadRequest, ModelNotFound, NotReady, UnsupportedMediaType
from service.lifecycle import Phase
from service.middleware import request_arrival
from service.model.pooling import LOGITS, pool
from service.protocols.v2_codec import (
    CLASSIFICATION_OUTPUTS,
    EMBEDDING_OUTPUT,
    IMAGE_INPUT,
    PIXELS_INPUT,
    build_infer_response,
    parse_infer_request,
)
from service.repository import scan_store
from service.served import EncodedImage, ServedModel

PLATFORM = "pytorch_deit"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "model_repository")
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
    """The version a path names (``/versions/{v}``), or the model's newest loaded one."""
    if version is not None and not version.isdigit():
        state.store.get(name)  # an unknown model is named as such first
        raise ModelNotFound(f"model {name!r} has no version {version!r}: versions are numbers")
    served = state.store.get(name, None if version is None else int(version))
    return served


def _output_widths(served: ServedModel) -> dict[str, int]:
    """The outputs a model gives and their width: the class scores of a classifier, the embedding of every one."""
    widths = dict.fromkeys(CLASSIFICATION_OUTPUTS, len(served.labels)) if served.classifies else {}
    widths[EMBEDDING_OUTPUT] = served.embedding_dim
    return widths


def _versions(state: AppState, served: ServedModel) -> list[str]:
    return [str(v) for v in sorted(state.store.versions.get(served.name, {served.version: served}))]


def _metadata(served: ServedModel, versions: list[str]) -> dict[str, Any]:
    h, w = served.preprocessor.cfg.output_size
    return {
        "name": served.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1, 1]},
            {"name": PIXELS_INPUT, "datatype": "FP32", "shape": [-1, 3, h, w]},
        ],
        "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, d]} for n, d in _output_widths(served).items()],
        "tasks": served.tasks,
    }


def _config(served: ServedModel, max_batch_size: int, versions: list[str]) -> dict[str, Any]:
    """Triton's model configuration, as far as clients (perf_analyzer) read it: batch dim left out of ``dims``."""
    h, w = served.preprocessor.cfg.output_size
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
        "output": [{"name": n, "data_type": "TYPE_FP32", "dims": [d]} for n, d in _output_widths(served).items()],
        "dynamic_batching": {},
        "version_policy": {"specific": {"versions": [int(v) for v in versions]}},
    }


@router.get("/v2/models/{model_name}", summary="Model metadata", dependencies=Authorized)
@router.get(
    "/v2/models/{model_name}/versions/{model_version}", summary="Model metadata of one version", dependencies=Authorized
)
async def model_metadata(state: State, model_name: str, model_version: str | None = None) -> dict[str, Any]:
    served = _model(state, model_name, model_version)
    return _metadata(served, _versions(state, served))


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
    served = _model(state, model_name, model_version)
    return _config(served, state.settings.max_batch_size, _versions(state, served))


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
                body, header_length, input_size=served.input_size, max_elements=settings.max_files,
                offered=list(_output_widths(served)),
            ),
        )  # fmt: skip
        if parsed.timeout_s is not None:
            admitted.context.shorten(request_arrival(request) + parsed.timeout_s)
        embedding = next((o for o in parsed.outputs if o.name == EMBEDDING_OUTPUT), None)
        pooling = served.pooling(embedding.pooling if embedding is not None else None)
        if parsed.images is not None:
            outputs = await admitted.outputs([EncodedImage(f"image {i}", data) for i, data in enumerate(parsed.images)])
        else:
            assert parsed.pixels is not None
            outputs = await admitted.outputs(parsed.pixels)
    tensors: dict[str, Tensor] = {}
    if LOGITS in outputs:  # one forward pass gave the class scores and the embedding's features
        tensors = {"logits": outputs[LOGITS], "probabilities": torch.softmax(outputs[LOGITS], dim=-1)}
    if embedding is not None:
        tensors[EMBEDDING_OUTPUT] = pool(outputs, pooling, embedding.normalize)
    content, json_length = build_infer_response(
        served.name, str(served.version), parsed.id, parsed.outputs, tensors, served.labels
    )
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(json_length)}
    )


# --- model repository extension -------------------------------------------------------------------------------


@router.post("/v2/repository/index", summary="Every model version of the store, loaded or not", dependencies=Authorized)
async def repository_index(
    state: State, body: Annotated[dict[str, Any] | None, Body()] = None
) -> list[dict[str, str]]:  # fmt: skip
    ready_only = bool((body or {}).get("ready", False))
    contents = await asyncio.to_thread(scan_store, state.settings.model_store)
    return state.store.index(contents, ready_only)


@router.post("/v2/repository/models/{model_name}/load", summary="Load or reload a model", dependencies=Authorized)
async def repository_load(state: State, model_name: str) -> Response:
    state.lifecycle.check_accepting()
    await state.store.load(model_name)
    return Response(status_code=200)


@router.post("/v2/repository/models/{model_name}/unload", summary="Unload a model", dependencies=Authorized)
async def repository_unload(state: State, model_name: str) -> Response:
    state.lifecycle.check_accepting()
    await state.store.unload(model_name)
    return Response(status_code=200)


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise BadRequest(f"Inference-Header-Content-Length must be a byte count, not {value!r}")
    return int(value)
