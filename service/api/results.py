"""Pure post-processing over the engine's outputs (``Inference``), shared by every front door: class scores, top-k,
embeddings and their encodings. No state and no I/O, so each answer is the same whichever protocol asked."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from service.engine.served import Inference
from service.model.pooling import Pooling, pool

SCORE_FUNCTIONS = ("softmax", "sigmoid", "none")  # what the Hugging Face API's ``function_to_apply`` may name


@dataclass(frozen=True)
class ClassScore:
    """One class of an image's top-k: its label, index in the model's output, and score."""

    label: str
    index: int
    score: float


def logits(inference: Inference) -> Tensor:
    """The class logits ``[N, labels]`` (the average of a distilled model's two heads); the front door refused a
    classification request to a model without a head before it ran."""
    if inference.logits is None:
        raise ValueError("the model has no classification head; its requests were to be refused at admission")
    return inference.logits


def scores(values: Tensor, function: str = "softmax") -> Tensor:
    """Class scores from logits: softmax (probabilities), sigmoid, or the logits as they are (``none``)."""
    if function == "softmax":
        return torch.softmax(values, dim=-1)
    if function == "sigmoid":
        return torch.sigmoid(values)
    if function == "none":
        return values
    raise ValueError(f"unknown score function {function!r}")


def top_k(values: Tensor, k: int, labels: Sequence[str]) -> list[list[ClassScore]]:
    """Per row, the ``k`` highest-scoring classes (capped at the labels), highest first."""
    top, indices = values.topk(min(k, values.shape[-1]), dim=-1)
    return [
        [ClassScore(labels[i], i, s) for s, i in zip(row_scores, row_indices, strict=True)]
        for row_scores, row_indices in zip(top.tolist(), indices.tolist(), strict=True)
    ]


def embeddings(inference: Inference, pooling: Pooling, normalize: bool) -> Tensor:
    """``[N, hidden_size]``: each image's features pooled as ``pooling`` asks, of unit length when ``normalize``."""
    return pool(inference.features, pooling, normalize)


def float32_bytes(values: Tensor) -> bytes:
    """The values as little-endian float32, row after row (raw embedding bodies, binary tensor data)."""
    data: bytes = values.numpy().astype("<f4").tobytes()
    return data


def base64_rows(values: Tensor) -> list[str]:
    """Each row's little-endian float32 bytes in base64 (about a quarter of JSON numbers' size, exact)."""
    return [base64.b64encode(float32_bytes(row)).decode() for row in values]
