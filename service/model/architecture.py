"""Architecture description of a DeiT/ViT checkpoint, read from an HF ``config.json`` or from tensor shapes."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from service.errors import CheckpointError
from service.model.json_files import naming


class Architecture(StrEnum):
    """The model heads we can build; values are the HF class names."""

    BARE = "DeiTModel"
    SINGLE_HEAD = "DeiTForImageClassification"
    DISTILLED = "DeiTForImageClassificationWithTeacher"
    MASKED_IMAGE_MODELING = "DeiTForMaskedImageModeling"

    @property
    def classifies(self) -> bool:
        return self in (Architecture.SINGLE_HEAD, Architecture.DISTILLED)


# HF class names we accept, mapped to what we build. ViT-format DeiT releases use the ViT classes.
_ARCHITECTURES: dict[str, Architecture] = {
    "DeiTModel": Architecture.BARE,
    "ViTModel": Architecture.BARE,
    "DeiTForImageClassification": Architecture.SINGLE_HEAD,
    "ViTForImageClassification": Architecture.SINGLE_HEAD,
    "DeiTForImageClassificationWithTeacher": Architecture.DISTILLED,
    "DeiTForMaskedImageModeling": Architecture.MASKED_IMAGE_MODELING,
    "ViTForMaskedImageModeling": Architecture.MASKED_IMAGE_MODELING,
}


@dataclass(frozen=True)
class DeiTConfig:
    """Hyper-parameters of one model; field names follow HF's ``config.json``."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    encoder_stride: int = 16
    hidden_act: str = "gelu"
    # "deit" checkpoints carry a distillation token; "vit" ones (non-distilled DeiT releases) do not.
    model_type: str = "deit"
    architecture: Architecture = Architecture.DISTILLED
    add_pooling_layer: bool = False
    # DeiT III (timm ``deit3_*``): a learned per-channel scale on each residual branch's output.
    layer_scale: bool = False
    # False for DeiT III: position embeddings cover the patches only, and the CLS token is prepended after them.
    prefix_position_embeddings: bool = True
    id2label: dict[int, str] = field(default_factory=dict)
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise CheckpointError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.patch_size > self.image_size:
            raise CheckpointError(
                f"patch_size {self.patch_size} is larger than image_size {self.image_size}: no patch fits the image"
            )
        eps = self.layer_norm_eps
        if not _is_number(eps) or not math.isfinite(eps) or eps <= 0:
            raise CheckpointError(f"layer_norm_eps must be a finite number above 0, got {eps!r}")
        if not isinstance(self.qkv_bias, bool):
            raise CheckpointError(f"qkv_bias must be true or false, got {self.qkv_bias!r}")
        if self.hidden_act not in ("gelu", "gelu_python"):
            raise CheckpointError(f"unsupported hidden_act {self.hidden_act!r}; DeiT uses exact 'gelu'")
        if self.model_type not in ("deit", "vit"):
            raise CheckpointError(f"unsupported model_type {self.model_type!r}; expected 'deit' or 'vit'")
        if self.architecture is Architecture.DISTILLED and not self.has_distillation_token:
            raise CheckpointError("a distilled (two-head) model needs model_type 'deit'")
        if sorted(self.id2label) != list(range(len(self.id2label))):
            raise CheckpointError(f"id2label must number its labels 0..{len(self.id2label) - 1} exactly")
        bad = next((v for v in self.id2label.values() if not isinstance(v, str)), None)
        if bad is not None:
            raise CheckpointError(f"id2label values must be label strings, got {bad!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_distillation_token(self) -> bool:
        return self.model_type == "deit"

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.has_distillation_token else 1

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_position_embeddings(self) -> int:
        return self.num_patches + (self.num_prefix_tokens if self.prefix_position_embeddings else 0)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def prefix(self) -> str:
        """State-dict prefix of the encoder (``deit.`` or ``vit.``)."""
        return f"{self.model_type}."

    def with_labels(self, labels: list[str]) -> DeiTConfig:
        return replace(self, id2label=dict(enumerate(labels)))

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> DeiTConfig:
        """Build from an HF ``config.json``; fields missing from old configs take the documented defaults.

        Every value is checked for its type and range here, so that a broken file is refused at load with the
        field named, rather than failing later as an arithmetic or shape error inside the model.
        """
        with naming(source):
            return cls._from_hf_dict(raw)

    @classmethod
    def _from_hf_dict(cls, raw: dict[str, Any]) -> DeiTConfig:
        model_type = _string(raw, "model_type", "deit")
        names = raw.get("architectures") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"architectures must be a list of class names, got {names!r}")
        arch: Architecture | None = None
        for name in names:
            # TensorFlow classes (TFDeiT…) build the same model; transformers usually saves the PyTorch name anyway.
            name = name.removeprefix("TF") if name.removeprefix("TF") in _ARCHITECTURES else name
            if name in _ARCHITECTURES:
                arch = _ARCHITECTURES[name]
                break
        if arch is None:
            if names:
                raise CheckpointError(f"unknown architecture {names!r}; supported: {sorted(_ARCHITECTURES)}")
            arch = Architecture.DISTILLED if model_type == "deit" else Architecture.SINGLE_HEAD
        id2label = _id2label(raw.get("id2label"))
        num_labels = raw.get("num_labels")
        if num_labels is not None and (not _is_int(num_labels) or num_labels < 0):
            raise CheckpointError(f"num_labels must be a non-negative integer, got {num_labels!r}")
        if id2label and num_labels is not None and num_labels != len(id2label):
            raise CheckpointError(f"num_labels is {num_labels} but id2label holds {len(id2label)} labels")
        if not id2label and arch.classifies:
            if num_labels == 0:
                raise CheckpointError(f"num_labels is 0: a classifier ({arch.value}) needs at least one class")
            id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
        defaults = cls()
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        if not isinstance(dtype, str):
            raise CheckpointError(f"torch_dtype must be a dtype name, got {dtype!r}")
        return cls(
            hidden_size=_integer(raw, "hidden_size", defaults.hidden_size),
            num_hidden_layers=_integer(raw, "num_hidden_layers", defaults.num_hidden_layers),
            num_attention_heads=_integer(raw, "num_attention_heads", defaults.num_attention_heads),
            intermediate_size=_integer(raw, "intermediate_size", defaults.intermediate_size),
            image_size=_integer(raw, "image_size", defaults.image_size),
            patch_size=_integer(raw, "patch_size", defaults.patch_size),
            num_channels=_integer(raw, "num_channels", defaults.num_channels),
            encoder_stride=_integer(raw, "encoder_stride", defaults.encoder_stride),
            layer_norm_eps=_number(raw, "layer_norm_eps", defaults.layer_norm_eps),
            qkv_bias=_boolean(raw, "qkv_bias", defaults.qkv_bias),
            hidden_act=_string(raw, "hidden_act", defaults.hidden_act),
            model_type=model_type,
            architecture=arch,
            id2label=id2label,
            torch_dtype=dtype,
        )


# Sizes that must be integers of at least 1 (zero heads or patches would divide by zero inside the model).
_POSITIVE_INTS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
    "num_channels",
    "encoder_stride",
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(raw: dict[str, Any], name: str, default: int) -> int:
    """An integer field; ``224.0`` is read as 224 (some writers emit floats), ``"224"`` or ``true`` are refused."""
    value = raw.get(name, default)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not _is_int(value):
        raise CheckpointError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _number(raw: dict[str, Any], name: str, default: float) -> float:
    value = raw.get(name, default)
    if not _is_number(value):
        raise CheckpointError(f"{name} must be a number, got {value!r}")
    return float(value)


def _boolean(raw: dict[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"{name} must be true or false, got {value!r}")
    return value


def _string(raw: dict[str, Any], name: str, default: str) -> str:
    value = raw.get(name, default)
    if not isinstance(value, str):
        raise CheckpointError(f"{name} must be a string, got {value!r}")
    return value


def _id2label(value: object) -> dict[int, str]:
    """``{"0": "cat", …}``: keys are class indices written as strings (JSON keys always are), values labels."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"id2label must be a mapping of class index to label, got a {type(value).__name__}")
    labels: dict[int, str] = {}
    for key, label in value.items():
        text = str(key).strip()
        if isinstance(key, bool) or not re.fullmatch(r"-?[0-9]+", text):
            raise CheckpointError(f"id2label keys must be integer class indices, got {key!r}")
        if not isinstance(label, str):
            raise CheckpointError(f"id2label[{key!r}] must be a label string, got {label!r}")
        labels[int(text)] = label
    if len(labels) != len(value):
        raise CheckpointError("id2label names one class index twice")
    return labels
