"""The front doors' shared post-processing, as pure functions over the engine's outputs: no server needed."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from service.api import results
from service.engine.served import Inference
from service.model.pooling import Pooling

LABELS = ["cat", "dog", "eel", "fox"]


def _inference(with_head: bool = True) -> Inference:
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0], [5.0, -1.0, 0.5, 4.0]]) if with_head else None
    cls = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    distillation = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    return Inference(logits, {Pooling.CLS: cls, Pooling.DISTILLATION: distillation, Pooling.MEAN: cls * 2})


def test_top_k_ranks_highest_first_with_labels_and_caps_at_the_labels() -> None:
    probabilities = results.scores(results.logits(_inference()))
    ranked = results.top_k(probabilities, 2, LABELS)
    assert [[c.label for c in row] for row in ranked] == [["dog", "eel"], ["cat", "fox"]]
    assert [[c.index for c in row] for row in ranked] == [[1, 2], [0, 3]]
    assert ranked[0][0].score == pytest.approx(float(probabilities[0, 1]))
    assert [len(row) for row in results.top_k(probabilities, 10, LABELS)] == [4, 4]


def test_score_functions_are_softmax_sigmoid_or_the_logits() -> None:
    logits = results.logits(_inference())
    torch.testing.assert_close(results.scores(logits).sum(dim=-1), torch.ones(2))
    torch.testing.assert_close(results.scores(logits, "sigmoid"), 1 / (1 + torch.exp(-logits)))
    assert results.scores(logits, "none") is logits
    assert set(results.SCORE_FUNCTIONS) == {"softmax", "sigmoid", "none"}
    with pytest.raises(ValueError, match="unknown score function 'relu'"):
        results.scores(logits, "relu")


def test_a_model_without_a_head_has_no_logits_to_rank() -> None:
    with pytest.raises(ValueError, match="no classification head"):
        results.logits(_inference(with_head=False))


def test_embeddings_pool_the_features_and_normalize_to_unit_length() -> None:
    inference = _inference(with_head=False)
    both = results.embeddings(inference, Pooling.CLS_DISTILLATION, normalize=False)
    torch.testing.assert_close(both, torch.tensor([[2.0, 2.0], [0.5, 1.0]]))
    unit = results.embeddings(inference, Pooling.CLS, normalize=True)
    torch.testing.assert_close(unit, torch.tensor([[0.6, 0.8], [1.0, 0.0]]))


def test_float32_encodings_round_trip_exactly() -> None:
    vectors = torch.tensor([[0.1, -2.5, 3e-8], [1e6, 0.0, -0.0]])
    raw = results.float32_bytes(vectors)
    assert len(raw) == 6 * 4
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(2, 3), vectors.numpy())
    rows = results.base64_rows(vectors)
    decoded = [np.frombuffer(base64.b64decode(row), "<f4") for row in rows]
    np.testing.assert_array_equal(np.stack(decoded), vectors.numpy())
