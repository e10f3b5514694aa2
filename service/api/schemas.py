"""Response bodies, typed for the OpenAPI schema."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from service.engine.served import ServedModel


class Prediction(BaseModel):
    label: str = Field(description="class name")
    index: int = Field(description="class index in the model's output")
    score: float = Field(description="softmax probability of the averaged CLS + distillation logits")


class ImageResult(BaseModel):
    filename: str
    predictions: list[Prediction] = Field(description="top-k classes, highest score first")


class ClassifyResponse(BaseModel):
    model: str
    results: list[ImageResult]


class Embedding(BaseModel):
    filename: str
    embedding: list[float] | str = Field(
        description="the vector: JSON numbers, or with encoding=base64 its little-endian float32 bytes in base64"
    )


class EmbedResponse(BaseModel):
    model: str
    pooling: str = Field(description="how the tokens became one vector (the model's natural pooling unless asked)")
    normalized: bool = Field(description="whether each vector was scaled to unit length")
    encoding: str = Field(description="'float' (JSON numbers) or 'base64' (little-endian float32)")
    dim: int = Field(description="length of each vector")
    results: list[Embedding]


class RuntimeReport(BaseModel):
    """What runs a model's forward pass (``--runtime``), at which precision, and why it was chosen."""

    name: str = Field(description="torch, openvino or onnxruntime")
    precision: str = Field(description="float32, bfloat16, float16 or int8")
    reason: str = Field(description="--runtime as asked, or what auto measured")

    @classmethod
    def of(cls, served: ServedModel) -> RuntimeReport:
        info = served.runtime
        return cls(name=info.name, precision=info.precision, reason=info.reason)


class ModelInfo(BaseModel):
    name: str
    architecture: str
    tasks: list[str] = Field(description="what the model serves: 'embed', and 'classify' when it has a head")
    num_labels: int
    embedding_dim: int = Field(description="length of its /embed vectors")
    poolings: list[str] = Field(description="poolings /embed offers for it, the default first")
    image_size: int
    input_size: tuple[int, int] = Field(description="(height, width) of the preprocessed input")
    dtype: str
    device: str
    runtime: RuntimeReport
    parameters: int
    ready: bool = Field(description="the service takes work: models loaded and warm, not draining")
    default: bool
    version: int = Field(1, description="the version requests that name none get: the newest loaded")
    versions: list[int] = Field(default_factory=list, description="loaded versions (?version=N serves one)")
    hub_id: str | None = Field(None, description="the Hugging Face hub repository it was loaded from, if any")
    revision: str | None = Field(None, description="the hub commit served, pinned for the life of the process")


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: str


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable error name")
    message: str = Field(description="what went wrong, for people")


class ErrorBody(BaseModel):
    error: ErrorDetail


class PlainErrorBody(BaseModel):
    """Errors on the Open Inference Protocol and Hugging Face paths: the shape their clients read."""

    error: str = Field(description="what went wrong, for people")
