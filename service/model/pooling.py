"""Embeddings: which token poolings a model offers, its natural one, and pooling the forward pass's features.

The serving forward pass (``serving_outputs``) gives, per image, a classifier's logits and the final-normed token
features every pooling is made from (``FEATURES``), so that one pass serves classification and embedding requests
alike; pooling them is then a few vector sums. The model itself only gives tokens and logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

import torch.nn.functional as F
from torch import Tensor

from service.model.architecture import Architecture, DeiTConfig
from service.model.deit import DeiT

LOGITS = "logits"  # the classifiers' class logits, beside the features in the forward pass's outputs


class Pooling(StrEnum):
    """One vector per image out of the final-normed token sequence."""

    CLS = "cls"  # the CLS token
    DISTILLATION = "distillation"  # the distillation token (DeiT checkpoints)
    CLS_DISTILLATION = "cls_distillation"  # mean of both: a distilled DeiT's pre-logits features (as timm's)
    MEAN = "mean"  # mean of the patch tokens (prefix tokens left out)
    POOLER = "pooler"  # tanh(dense(CLS)): a bare model's pooler output


# Features the forward pass gives per image; CLS_DISTILLATION is made from two of them.
FEATURES = (Pooling.CLS, Pooling.DISTILLATION, Pooling.MEAN, Pooling.POOLER)


def has_pooler(config: DeiTConfig) -> bool:
    return config.architecture is Architecture.BARE and config.add_pooling_layer


def poolings(config: DeiTConfig) -> tuple[Pooling, ...]:
    """The poolings this model offers, its natural one first."""
    offered = [Pooling.CLS, Pooling.MEAN]
    if config.has_distillation_token:
        offered += [Pooling.DISTILLATION, Pooling.CLS_DISTILLATION]
    if has_pooler(config):
        offered.append(Pooling.POOLER)
    natural = default_pooling(config)
    return (natural, *(p for p in offered if p is not natural))


def default_pooling(config: DeiTConfig) -> Pooling:
    """What the model was trained to put in one vector: the pooler where there is one; both tokens of a distilled
    model (its heads read both); the patch mean for masked image modeling (its loss never reaches the CLS token);
    else the CLS token, which the single head and a bare model's pooler read."""
    arch = config.architecture
    if has_pooler(config):
        return Pooling.POOLER
    if arch is Architecture.DISTILLED:
        return Pooling.CLS_DISTILLATION
    if arch is Architecture.MASKED_IMAGE_MODELING:
        return Pooling.MEAN
    return Pooling.CLS


def feature_names(config: DeiTConfig) -> tuple[Pooling, ...]:
    """The features the forward pass of this model gives."""
    offered = set(poolings(config))
    return tuple(f for f in FEATURES if f in offered)


def pool(features: Mapping[str, Tensor], pooling: Pooling, normalize: bool = False) -> Tensor:
    """``[N, hidden_size]`` from the forward pass's features (``[N, hidden_size]`` each); unit length if asked."""
    if pooling is Pooling.CLS_DISTILLATION:
        vectors = (features[Pooling.CLS] + features[Pooling.DISTILLATION]) / 2
    else:
        vectors = features[pooling]
    return F.normalize(vectors, dim=-1) if normalize else vectors


def token_features(model: DeiT, tokens: Tensor) -> dict[str, Tensor]:
    """The features of ``feature_names`` from the final-normed token sequence ``[N, T, hidden_size]``."""
    config = model.config
    out: dict[str, Tensor] = {}
    for name in feature_names(config):
        if name is Pooling.CLS:
            out[name] = tokens[:, 0]
        elif name is Pooling.DISTILLATION:
            out[name] = tokens[:, 1]
        elif name is Pooling.MEAN:
            out[name] = tokens[:, config.num_prefix_tokens :].mean(dim=1)
        elif name is Pooling.POOLER and model.backbone.pooler is not None:
            out[name] = model.backbone.pooler(tokens)
    return out


def serving_outputs(model: DeiT, pixel_values: Tensor) -> dict[str, Tensor]:
    """What serving reads of one pass, per image: the logits (classifiers) and the token features every pooling is
    made from, so that one pass answers classify and embed alike."""
    tokens = model.forward_features(pixel_values)
    out = {LOGITS: model.forward_head(tokens)} if model.config.architecture.classifies else {}
    out.update(token_features(model, tokens))
    return out
