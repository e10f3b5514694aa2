"""HTTP endpoints; each handler is a few lines over the store, the batcher and the lifecycle."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api import results
from service.api.admission import Authorized, MetricsAuthorized, State, TimeoutHeader, accepting_model, admit
from service.api.schemas import (
    ClassifyResponse,
    EmbedResponse,
    ErrorBody,
    Health,
    ModelInfo,
    ModelList,
    RuntimeReport,
)
from service.engine.lifecycle import Phase
from service.engine.served import CLASSIFY, ServedModel
from service.errors import InvalidParameter, NotReady
from service.http.body import FILE_FIELD
from service.http.responses import json_response


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in codes}


router = APIRouter()
ModelQuery = Annotated[str | None, Query(description="model name (default model when omitted)")]
VersionQuery = Annotated[int | None, Query(ge=0, description="model version (default: the newest loaded)")]

_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {
                        FILE_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more images (repeat the field)",
                        }
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="Classify one or more images",
    description="Multipart upload with repeated field `file`, or one image as a raw `image/*` body. Scores are the "
    "softmax of the averaged CLS and distillation logits. Images of many requests share forward passes.",
    responses=_errors(400, 401, 404, 413, 415, 422, 499, 500, 503, 504),
    openapi_extra=_CLASSIFY_BODY,
    dependencies=[Authorized],
)
async def classify_images(
    request: Request,
    state: State,
    model: ModelQuery = None,
    top_k: Annotated[int | None, Query(ge=1, description="predictions per image (default 5)")] = None,
    version: VersionQuery = None,
    x_request_timeout: TimeoutHeader = None,
) -> Response:
    served = accepting_model(state, model, version, task=CLASSIFY)
    num_labels = len(served.labels)
    if top_k is not None and top_k > num_labels:
        raise InvalidParameter(f"top_k={top_k} exceeds the {num_labels} labels of model {served.name!r}")
    k = min(top_k or state.settings.default_top_k, num_labels)
    async with admit(request, state, served, x_request_timeout) as admitted:
        uploads = await admitted.uploads()
        inference = await admitted.infer(uploads)
    ranked = results.top_k(results.scores(results.logits(inference)), k, served.labels)
    body = {
        "model": served.name,
        "results": [
            {"filename": upload.name, "predictions": [dataclasses.asdict(p) for p in predictions]}
            for upload, predictions in zip(uploads, ranked, strict=True)
        ],
    }
    return json_response(body)


OCTET_STREAM = "application/octet-stream"
SHAPE_HEADER = "X-Embedding-Shape"


@router.post(
    "/embed",
    response_model=EmbedResponse,
    summary="Embed one or more images: one float vector per image",
    description="The same uploads as /classify. Each image's final-normed tokens pooled into one vector: the "
    "model's natural pooling unless `pooling` names another (GET /v1/models lists them). With `Accept: "
    f"{OCTET_STREAM}` the body is the raw little-endian float32 matrix, its shape in `{SHAPE_HEADER}: N,D`. "
    "Embedding and classification requests share forward passes.",
    responses={200: {"content": {OCTET_STREAM: {}}}, **_errors(400, 401, 404, 413, 415, 422, 499, 500, 503, 504)},
    openapi_extra=_CLASSIFY_BODY,
    dependencies=[Authorized],
)
async def embed_images(
    request: Request,
    state: State,
    model: ModelQuery = None,
    version: VersionQuery = None,
    pooling: Annotated[str | None, Query(description="cls, distillation, cls_distillation, mean or pooler")] = None,
    normalize: Annotated[bool, Query(description="scale each vector to unit length")] = False,
    encoding: Annotated[
        Literal["float", "base64"], Query(description="JSON numbers, or base64 of little-endian float32")
    ] = "float",
    x_request_timeout: TimeoutHeader = None,
) -> Response:
    served = accepting_model(state, model, version)
    chosen = served.pooling(pooling)
    raw = _wants_octet_stream(request.headers.get("accept", ""))
    if raw and encoding != "float":
        raise InvalidParameter(f"encoding={encoding} is for JSON bodies; Accept: {OCTET_STREAM} is raw float32")
    async with admit(request, state, served, x_request_timeout) as admitted:
        uploads = await admitted.uploads()
        inference = await admitted.infer(uploads)
    vectors = results.embeddings(inference, chosen, normalize)
    n, dim = vectors.shape
    if raw:
        headers = {SHAPE_HEADER: f"{n},{dim}", "X-Embedding-Dtype": "float32", "X-Embedding-Pooling": chosen.value}
        return Response(results.float32_bytes(vectors), media_type=OCTET_STREAM, headers=headers)
    rows: list[Any] = results.base64_rows(vectors) if encoding == "base64" else vectors.tolist()
    body = {
        "model": served.name,
        "pooling": chosen.value,
        "normalized": normalize,
        "encoding": encoding,
        "dim": dim,
        "results": [{"filename": u.name, "embedding": row} for u, row in zip(uploads, rows, strict=True)],
    }
    return json_response(body)


def _wants_octet_stream(accept: str) -> bool:
    """Raw float32 when the client lists application/octet-stream before (or without) application/json; a type
    given ``q=0`` is one the client refuses, as if it were not listed."""
    for part in accept.split(","):
        media_type, *params = (p.strip().lower() for p in part.split(";"))
        if any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params):
            continue
        if media_type == OCTET_STREAM:
            return True
        if media_type == "application/json":
            return False
    return False


def _model_info(served: ServedModel, default: str | None, ready: bool, versions: list[int] | None = None) -> ModelInfo:
    cp = served.checkpoint
    return ModelInfo(
        name=served.name,
        architecture=cp.config.architecture.value,
        tasks=served.tasks,
        num_labels=cp.config.num_labels if served.classifies else 0,
        embedding_dim=served.embedding_dim,
        poolings=[p.value for p in served.poolings],
        image_size=cp.config.image_size,
        input_size=served.preprocessor.cfg.output_size,
        dtype=str(cp.dtype).removeprefix("torch."),
        device=str(cp.device),
        runtime=RuntimeReport.of(served),
        parameters=cp.num_parameters,
        ready=ready,
        default=served.name == default,
        version=served.version,
        versions=versions or [served.version],
        hub_id=served.origin.ref.repo_id if served.origin else None,
        revision=served.origin.commit if served.origin else None,
    )


@router.get("/v1/models", response_model=ModelList, responses=_errors(401), dependencies=[Authorized])
async def list_models(state: State) -> ModelList:
    store = state.store
    ready = state.lifecycle.phase is Phase.READY
    return ModelList(
        models=[
            _model_info(m, store.default_name, ready, sorted(store.versions[m.name])) for m in store.models.values()
        ]
    )


@router.get("/v1/models/{name}", response_model=ModelInfo, responses=_errors(401, 404), dependencies=[Authorized])
async def get_model(name: str, state: State) -> ModelInfo:
    served = state.store.get(name)
    ready = state.lifecycle.phase is Phase.READY
    return _model_info(served, state.store.default_name, ready, sorted(state.store.versions[served.name]))


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
@router.head("/healthz", include_in_schema=False)  # probes that only look at the status
async def healthz() -> Health:
    return Health(status="alive")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: every model loaded and warm, not draining",
    responses=_errors(503),
)
@router.head("/readyz", include_in_schema=False)
async def readyz(state: State) -> Health:
    phase = state.lifecycle.phase
    if phase is not Phase.READY:
        raise NotReady(f"not ready: {phase.value}" + (f" ({state.lifecycle.error})" if state.lifecycle.error else ""))
    return Health(status="ready")


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **_errors(401)},
    dependencies=[MetricsAuthorized],
)
async def metrics(state: State) -> Response:
    state.metrics.ready.set(1 if state.lifecycle.phase is Phase.READY else 0)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
