"""Open Inference Protocol (KServe V2 / Triton REST) endpoints over the same engine as POST /classify.

Errors on these paths are ``{"error": "<message>"}`` (the protocol's shape; see service/app.py), with the status
codes of the native API.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import ValidationError
from torch import Tensor

from service import __version__
from service.api import results
from service.api.admission import (
    Admission,
    AppState,
    Authorized,
    State,
    TimeoutHeader,
    accepting_model,
    admit,
    version_number,
)
from service.api.control import load_model, read_control_json, unload_model
from service.api.protocol_schemas import (
    ConfigTensor,
    InferRequest,
    InferResponse,
    Live,
    ModelConfig,
    ModelMetadata,
    ModelReady,
    Ready,
    RepositoryIndexEntry,
    RepositoryIndexRequest,
    RepositoryLoadRequest,
    ServerMetadata,
    TensorMetadata,
    VersionPolicy,
    inline_schema,
)
from service.api.schemas import PlainErrorBody, RuntimeReport
from service.api.v2_codec import (
    CLASSIFICATION_OUTPUTS,
    EMBEDDING_OUTPUT,
    IMAGE_INPUT,
    PIXELS_INPUT,
    ParsedInferRequest,
    RequestedOutput,
    build_infer_response,
    embedding_output,
    parse_infer_request,
)
from service.engine.lifecycle import Phase
from service.engine.served import Inference, Inputs, ServedModel
from service.errors import (
    BadRequest,
    InvalidParameter,
    NotReady,
    UnsupportedMediaType,
)
from service.http.access_log import request_arrival
from service.images import EncodedImage
from service.model.pooling import Pooling

PLATFORM = "pytorch_deit"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics")
HEADER_LENGTH = "inference-header-content-length"


# Full paths on one router, no prefix or nested router: the metrics label a request by its route's own path.
router = APIRouter(tags=["Open Inference Protocol"])


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Error responses in the protocol's shape; 422 is listed so that FastAPI documents ours, not its own."""
    return {code: {"model": PlainErrorBody} for code in (*codes, 422)}


_MODEL: dict[str, Any] = {"dependencies": [Authorized], "responses": _errors(401, 404, 503)}
_INFER_ERRORS = _errors(400, 401, 404, 408, 413, 415, 499, 500, 503, 504)
_INFER_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferResponse,
        "description": "JSON, or with binary outputs the JSON header (Inference-Header-Content-Length bytes) then "
        "each binary output's raw bytes in output order",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_schema(InferRequest)},
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "binary tensor data: the JSON request (Inference-Header-Content-Length bytes), "
                    "then each input's binary_data_size bytes in input order",
                }
            },
        },
    }
}


async def _path_version(request: Request) -> str | None:
    """The ``{model_version}`` of the versioned routes; None on the others (not a query parameter there)."""
    version: str | None = request.path_params.get("model_version")
    return version


Version = Annotated[str | None, Depends(_path_version)]
_VERSION_PARAMETER = {"name": "model_version", "in": "path", "required": True, "schema": {"type": "string"}}


def _versioned(route: dict[str, Any]) -> dict[str, Any]:
    """The same route options, documenting the path's ``{model_version}`` (read by ``Version``, not an argument)."""
    extra = dict(route.get("openapi_extra") or {})
    extra["parameters"] = [*extra.get("parameters", []), _VERSION_PARAMETER]
    return {**route, "openapi_extra": extra}


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="deit-serve", version=__version__, extensions=list(EXTENSIONS))


@router.get("/v2/health/live", summary="Liveness")
async def live() -> Live:
    return Live(live=True)


@router.get("/v2/health/ready", summary="Readiness: every model loaded and warm, not draining", responses=_errors(503))
async def ready(state: State) -> Ready:
    if state.lifecycle.phase is not Phase.READY:
        raise NotReady(f"not ready: {state.lifecycle.phase.value}")
    return Ready(ready=True)


def resolve_model(state: AppState, name: str, version: str | None) -> ServedModel:
    """The version a path names (``/versions/{v}``), or the model's newest loaded one."""
    return state.store.get(name, version_number(state, name, version))


def output_widths(served: ServedModel) -> dict[str, int]:
    """The outputs a model gives and their width: the class scores of a classifier, the embedding of every one."""
    widths = dict.fromkeys(CLASSIFICATION_OUTPUTS, len(served.labels)) if served.classifies else {}
    widths[EMBEDDING_OUTPUT] = served.embedding_dim
    return widths


async def infer_parsed(admitted: Admission, parsed: ParsedInferRequest, arrived: float) -> tuple[Inference, Pooling]:
    """An infer request once parsed, over any transport: its ``timeout`` parameter shortens the deadline (from
    ``arrived``), its images or pixels go through the one engine call; the pooling its embedding output asks for
    comes back with the outputs."""
    if parsed.timeout_s is not None:
        admitted.context.shorten(arrived + parsed.timeout_s)
    embedding = embedding_output(parsed.outputs)
    pooling = admitted.served.pooling(embedding.pooling if embedding is not None else None)
    inputs: Inputs
    if parsed.images is not None:
        inputs = [EncodedImage(f"image {i}", data) for i, data in enumerate(parsed.images)]
    else:
        assert parsed.pixels is not None
        inputs = parsed.pixels
    return await admitted.infer(inputs), pooling


def output_tensors(inference: Inference, requested: Sequence[RequestedOutput], pooling: Pooling) -> dict[str, Tensor]:
    """The protocol's output tensors from one forward pass (REST and gRPC alike): the class scores of a classifier
    (logits and their softmax), and the requested embedding (``pooling`` of the token features)."""
    tensors: dict[str, Tensor] = {}
    if inference.logits is not None:  # one forward pass gave the class scores and the embedding's features
        tensors = {"logits": inference.logits, "probabilities": results.scores(inference.logits)}
    embedding = embedding_output(requested)
    if embedding is not None:
        tensors[EMBEDDING_OUTPUT] = results.embeddings(inference, pooling, embedding.normalize)
    return tensors


def loaded_versions(state: AppState, served: ServedModel) -> list[str]:
    return [str(v) for v in sorted(state.store.versions.get(served.name, {served.version: served}))]


def metadata_of(served: ServedModel, versions: list[str]) -> ModelMetadata:
    h, w = served.preprocessor.cfg.output_size
    return ModelMetadata(
        name=served.name,
        versions=versions,
        platform=PLATFORM,
        inputs=[
            TensorMetadata(name=IMAGE_INPUT, datatype="BYTES", shape=[-1, 1]),
            TensorMetadata(name=PIXELS_INPUT, datatype="FP32", shape=[-1, 3, h, w]),
        ],
        outputs=[
            TensorMetadata(name=name, datatype="FP32", shape=[-1, width])
            for name, width in output_widths(served).items()
        ],
        tasks=served.tasks,
        hub_id=served.origin.ref.repo_id if served.origin else None,
        revision=served.origin.commit if served.origin else None,
        runtime=RuntimeReport.of(served),
    )


def config_of(served: ServedModel, max_batch_size: int, versions: list[str]) -> ModelConfig:
    """Triton's model configuration, as far as clients (perf_analyzer) read it: batch dim left out of ``dims``."""
    h, w = served.preprocessor.cfg.output_size
    return ModelConfig(
        name=served.name,
        platform=PLATFORM,
        backend=_BACKENDS.get(served.runtime.name, served.runtime.name),
        max_batch_size=max_batch_size,
        input=[
            ConfigTensor(name=IMAGE_INPUT, data_type="TYPE_STRING", dims=[1], optional=True),
            ConfigTensor(name=PIXELS_INPUT, data_type="TYPE_FP32", format="FORMAT_NCHW", dims=[3, h, w], optional=True),
        ],
        output=[
            ConfigTensor(name=name, data_type="TYPE_FP32", dims=[width])
            for name, width in output_widths(served).items()
        ],
        dynamic_batching={},
        version_policy=VersionPolicy(specific={"versions": [int(v) for v in versions]}),
        parameters={
            "runtime": {"string_value": served.runtime.name},
            "precision": {"string_value": served.runtime.precision},
            "runtime_reason": {"string_value": served.runtime.reason},
        },
    )


_BACKENDS = {"torch": "pytorch"}  # Triton's backend names; openvino and onnxruntime are the same in both


@router.get("/v2/models/{model_name}", summary="Model metadata", **_MODEL)
@router.get(
    "/v2/models/{model_name}/versions/{model_version}", summary="Model metadata of one version", **_versioned(_MODEL)
)
async def model_metadata(state: State, model_name: str, model_version: Version) -> ModelMetadata:
    served = resolve_model(state, model_name, model_version)
    return metadata_of(served, loaded_versions(state, served))


@router.get("/v2/models/{model_name}/ready", summary="Model readiness", **_MODEL)
@router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready",
    summary="Model readiness of one version",
    **_versioned(_MODEL),
)
async def model_ready(state: State, model_name: str, model_version: Version) -> ModelReady:
    served = resolve_model(state, model_name, model_version)
    if state.lifecycle.phase is not Phase.READY:
        raise NotReady(f"model {served.name!r} is not ready: {state.lifecycle.phase.value}")
    return ModelReady(name=served.name, ready=True)


_CONFIG: dict[str, Any] = {**_MODEL, "response_model_exclude_none": True}


@router.get("/v2/models/{model_name}/config", summary="Model configuration (Triton)", **_CONFIG)
@router.get(
    "/v2/models/{model_name}/versions/{model_version}/config",
    summary="Model configuration of one version",
    **_versioned(_CONFIG),
)
async def model_config(state: State, model_name: str, model_version: Version) -> ModelConfig:
    served = resolve_model(state, model_name, model_version)
    return config_of(served, state.settings.max_batch_size, loaded_versions(state, served))


_INFER: dict[str, Any] = {
    "dependencies": [Authorized],
    "response_class": Response,
    "responses": {**_INFER_OK, **_INFER_ERRORS},
    "openapi_extra": _INFER_BODY,
}


@router.post("/v2/models/{model_name}/infer", summary="Inference", **_INFER)
@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer", summary="Inference on one version", **_versioned(_INFER)
)
async def infer(
    request: Request,
    state: State,
    model_name: str,
    model_version: Version,
    x_request_timeout: TimeoutHeader = None,
    inference_header_content_length: Annotated[
        str | None, Header(description="with binary tensor data: bytes of the JSON header at the start of the body")
    ] = None,
) -> Response:
    settings = state.settings
    served = accepting_model(state, model_name, model_version)
    header_length = _header_length(inference_header_content_length)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not accepted: send the request uncompressed")
    async with admit(request, state, served, x_request_timeout) as admitted:
        body = await admitted.body()
        parsed = await state.decode_pool.run(
            admitted.context,
            lambda: parse_infer_request(
                body, header_length, input_size=served.input_size, max_elements=settings.max_files,
                offered=list(output_widths(served)),
            ),
        )  # fmt: skip
        inference, pooling = await infer_parsed(admitted, parsed, request_arrival(request))
    tensors = output_tensors(inference, parsed.outputs, pooling)
    content, json_length = build_infer_response(
        served.name, str(served.version), parsed.id, parsed.outputs, tensors, served.labels
    )
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(json_length)}
    )


# --- model repository extension -------------------------------------------------------------------------------


@router.post(
    "/v2/repository/index",
    summary="Every model version of the store, loaded or not",
    dependencies=[Authorized],
    responses=_errors(400, 401, 408, 413),
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": inline_schema(RepositoryIndexRequest)}},
        }
    },
)
async def repository_index(request: Request, state: State) -> list[RepositoryIndexEntry]:
    # The body is read here, after authentication: a declared body parameter would be read (whole) before it.
    body = await read_control_json(request, state, "the repository index request")
    if body is not None and not isinstance(body, dict):
        raise BadRequest("the repository index request must be a JSON object")
    ready = (body or {}).get("ready", False)
    if not isinstance(ready, bool):
        raise BadRequest(f"'ready' must be true or false, not {ready!r}")
    rows = await state.repository.index(ready_only=ready)
    return [RepositoryIndexEntry(**row) for row in rows]


# Triton's clients send the load request's JSON without a Content-Type; it is read in the handler, bounded, whatever
# the type (service/api/control.py).


@router.post(
    "/v2/repository/models/{model_name}/load",
    summary="Load or reload a model",
    dependencies=[Authorized],
    responses={
        200: {"description": "loaded, or already loaded and unchanged"},
        **_errors(400, 401, 403, 404, 408, 413, 503),
    },
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": inline_schema(RepositoryLoadRequest)}}}},
)
async def repository_load(request: Request, state: State, model_name: str) -> Response:
    state.lifecycle.check_accepting()  # before the body is read (the load checks again once it has it)
    body = _load_request(await read_control_json(request, state, "the load request"))
    await load_model(state, model_name, body.parameters.hub_id)
    return Response(status_code=200)


def _load_request(body: Any) -> RepositoryLoadRequest:
    """A load request's JSON (none: load from the store), checked against its schema."""
    if body is None:
        return RepositoryLoadRequest()
    try:
        return RepositoryLoadRequest.model_validate(body)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
        raise InvalidParameter(f"load request: {where}") from e


@router.post(
    "/v2/repository/models/{model_name}/unload",
    summary="Unload a model",
    dependencies=[Authorized],
    responses={200: {"description": "unloaded"}, **_errors(401, 404, 503)},
)
async def repository_unload(state: State, model_name: str) -> Response:
    await unload_model(state, model_name)
    return Response(status_code=200)


def _header_length(value: str | None) -> int | None:
    """The header's byte count; ASCII digits only (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    if value is None:
        return None
    if not (value.isascii() and value.strip().isdigit()):
        raise BadRequest(f"Inference-Header-Content-Length must be a byte count, not {value!r}")
    return int(value)
