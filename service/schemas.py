"""Response bodies, typed for the OpenAPI schema."""

from __future__ import annotations

from pydantic import BaseModel, Field


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


class ModelInfo(BaseModel):
    name: str
    architecture: str
    num_labels: int
    image_size: int
    input_size: tuple[int, int] = Field(description="(height, width) of the preprocessed input")
    dtype: str
    device: str
    parameters: int
    ready: bool
    default: bool


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
