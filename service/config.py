"""Architecture description of a DeiT/ViT checkpoint, read from an HF ``config.json`` or from tensor shapes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from service.errors import CheckpointError


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
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ("gelu", "gelu_python"):
            raise CheckpointError(f"unsupported hidden_act {self.hidden_act!r}; DeiT uses exact 'gelu'")
        if self.model_type not in ("deit", "vit"):
            raise CheckpointError(f"unsupported model_type {self.model_type!r}; expected 'deit' or 'vit'")
        if self.architecture is Architecture.DISTILLED and not self.has_distillation_token:
            raise CheckpointError("a distilled (two-head) model needs model_type 'deit'")

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
        """Build from an HF ``config.json``; fields missing from old configs take the documented defaults."""
        model_type = raw.get("model_type", "deit")
        names = raw.get("architectures") or []
        arch: Architecture | None = None
        for name in names:
            # TensorFlow classes (TFDeiT…) build the same model; transformers usually saves the PyTorch name anyway.
            name = name.removeprefix("TF") if name.removeprefix("TF") in _ARCHITECTURES else name
            if name in _ARCHITECTURES:
                arch = _ARCHITECTURES[name]
                break
        if arch is None:
            if names:
                raise CheckpointError(f"{source}: unknown architecture {names!r}; supported: {sorted(_ARCHITECTURES)}")
            arch = Architecture.DISTILLED if model_type == "deit" else Architecture.SINGLE_HEAD
        id2label_raw = raw.get("id2label") or {}
        try:
            id2label = {int(k): str(v) for k, v in id2label_raw.items()}
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: id2label keys must be integers") from e
        if id2label and sorted(id2label) != list(range(len(id2label))):
            raise CheckpointError(f"{source}: id2label must cover 0..{len(id2label) - 1} exactly")
        if not id2label and arch.classifies:
            num = int(raw.get("num_labels", 2))
            id2label = {i: f"LABEL_{i}" for i in range(num)}
        defaults = cls()
        try:
            return cls(
                hidden_size=int(raw.get("hidden_size", defaults.hidden_size)),
                num_hidden_layers=int(raw.get("num_hidden_layers", defaults.num_hidden_layers)),
                num_attention_heads=int(raw.get("num_attention_heads", defaults.num_attention_heads)),
                intermediate_size=int(raw.get("intermediate_size", defaults.intermediate_size)),
                image_size=int(raw.get("image_size", defaults.image_size)),
                patch_size=int(raw.get("patch_size", defaults.patch_size)),
                num_channels=int(raw.get("num_channels", defaults.num_channels)),
                layer_norm_eps=float(raw.get("layer_norm_eps", defaults.layer_norm_eps)),
                qkv_bias=bool(raw.get("qkv_bias", True)),
                encoder_stride=int(raw.get("encoder_stride", 16)),
                hidden_act=str(raw.get("hidden_act", "gelu")),
                model_type=str(model_type),
                architecture=arch,
                id2label=id2label,
                torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: {e}") from e
