"""Request and response bodies of the Open Inference Protocol and Hugging Face routes, typed for the OpenAPI schema.

The handlers parse request bodies themselves (binary tensor data, raw images, a byte budget), so the request models
only document them; the metadata responses are built from these models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from service.api.schemas import RuntimeReport

# A tensor's data: a flat or nested list of numbers or base64 strings (nested lists follow the shape).
TensorData = list[Any]


# --- Open Inference Protocol: metadata ---------------------------------------------------------------------------


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(description="protocol extensions this server supports")


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="BYTES, FP32, FP16, ...")
    shape: list[int] = Field(description="-1 for a variable dimension (the batch)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata] = Field(description="send exactly one of them")
    outputs: list[TensorMetadata]
    tasks: list[str] = Field(description="what the model serves: classify, embed")
    hub_id: str | None = Field(None, description="the Hugging Face hub repository it was loaded from, if any")
    revision: str | None = Field(None, description="the hub commit served, pinned for the life of the process")
    runtime: RuntimeReport


class ConfigTensor(BaseModel):
    name: str
    data_type: str = Field(description="Triton's type name: TYPE_STRING, TYPE_FP32, ...")
    dims: list[int] = Field(description="the shape without the batch dimension")
    format: str | None = None
    optional: bool | None = None


class VersionPolicy(BaseModel):
    specific: dict[str, list[int]]


class ModelConfig(BaseModel):
    """Triton's model configuration, as far as its clients (perf_analyzer, model analyzer) read it."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[ConfigTensor]
    output: list[ConfigTensor]
    dynamic_batching: dict[str, Any]
    version_policy: VersionPolicy
    parameters: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Triton's string parameters: runtime, precision, runtime_reason"
    )


# --- Open Inference Protocol: inference ---------------------------------------------------------------------------


class InferParameters(BaseModel):
    binary_data_output: bool | None = Field(None, description="every output as binary data after the JSON header")
    timeout: float | None = Field(None, ge=0, description="microseconds this request may take (0: the default)")


class InputParameters(BaseModel):
    binary_data_size: int | None = Field(
        None, ge=0, description="bytes of this tensor in the binary part of the body, in input order"
    )


class InferInputTensor(BaseModel):
    name: Literal["image", "pixel_values"] = Field(
        description="'image': BYTES [N] or [N, 1] encoded images; 'pixel_values': FP32 or FP16 [N, 3, H, W]"
    )
    datatype: str
    shape: list[int]
    parameters: InputParameters | None = None
    data: TensorData | None = Field(None, description="base64 strings (image) or numbers; or binary_data_size")


class OutputParameters(BaseModel):
    binary_data: bool | None = None
    classification: int | None = Field(None, ge=0, description='top-K as "score:index:label" strings')


class RequestedOutputTensor(BaseModel):
    name: Literal["probabilities", "logits"]
    parameters: OutputParameters | None = None


class InferRequest(BaseModel):
    """The JSON request, or the JSON header of a binary request (``Inference-Header-Content-Length`` bytes)."""

    id: str | None = None
    parameters: InferParameters | None = None
    inputs: list[InferInputTensor] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutputTensor] | None = Field(None, description="all outputs when omitted")


class OutputTensorParameters(BaseModel):
    binary_data_size: int


class InferOutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: OutputTensorParameters | None = Field(None, description="set when the data follows as binary")
    data: list[float] | list[str] | None = None


class InferResponse(BaseModel):
    """The JSON response, or the JSON header of a binary one (its length in ``Inference-Header-Content-Length``)."""

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutputTensor]


# --- Hugging Face image-classification API ---------------------------------------------------------------------


class HFParameters(BaseModel):
    top_k: int | None = Field(None, ge=1, description="classes per image (default 5)")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = None


class HFRequest(BaseModel):
    inputs: str | list[str] = Field(description="a base64-encoded image (or data URI), or a list of them")
    parameters: HFParameters | None = None


class HFPrediction(BaseModel):
    label: str
    score: float


HFResponse = list[HFPrediction] | list[list[HFPrediction]]  # a list per image when ``inputs`` was a list


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` written in place, to stand inside an OpenAPI operation."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


# --- Open Inference Protocol: model repository extension ----------------------------------------------------------


class RepositoryLoadParameters(BaseModel):
    hub_id: str | None = Field(
        None, description="REPO_ID[@REVISION]: load this Hugging Face hub model under the name (allow_hub_ids)"
    )


class RepositoryLoadRequest(BaseModel):
    parameters: RepositoryLoadParameters = Field(default_factory=lambda: RepositoryLoadParameters(hub_id=None))


class RepositoryIndexRequest(BaseModel):
    ready: bool = Field(False, description="list only the versions that are ready")


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, UNAVAILABLE or LOADING")
    reason: str = Field(description="why it is in that state (a failed load's error)")
