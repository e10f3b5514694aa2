"""Tiny random-weight checkpoints written by transformers itself, in every on-disk format we load."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTForMaskedImageModeling,
    DeiTModel,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)

# The shapes transformers' own DeiT unit tests use: fast on any CPU, yet every code path is exercised.
TINY: dict[str, Any] = {
    "image_size": 30,
    "patch_size": 2,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "encoder_stride": 2,
}

HFKind = Literal["distilled", "single_head", "vit", "mim", "bare"]
HFFormat = Literal["safetensors", "bin", "sharded"]
TimmWrapping = Literal["plain", "model", "module", "model_module"]

_HF_CLASSES: dict[str, type[PreTrainedModel]] = {
    "distilled": DeiTForImageClassificationWithTeacher,
    "single_head": DeiTForImageClassification,
    "vit": ViTForImageClassification,
    "mim": DeiTForMaskedImageModeling,
    "bare": DeiTModel,
}


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Give every tensor random values: HF initialises tokens and positions to zero, which would hide bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("layernorm_before.weight") or name.endswith("layernorm_after.weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.3 * noise)
    return model


def hf_model(
    kind: HFKind, seed: int = 0, num_labels: int = 5, attn_implementation: str = "eager", **overrides: Any
) -> PreTrainedModel:
    """A tiny transformers model of ``kind`` with random weights, the reference our model must reproduce."""
    # Eager attention by default: the reference is then the literal softmax(QKᵀ/√d)V, not the SDPA kernel we call.
    fields = {**TINY, **overrides, "attn_implementation": attn_implementation}
    config: DeiTConfig | ViTConfig
    if kind == "vit":
        config = ViTConfig(num_labels=num_labels, **fields)
    else:
        config = DeiTConfig(num_labels=num_labels, **fields)
    config.id2label = {i: f"class_{i}" for i in range(num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    model = _HF_CLASSES[kind](config)
    randomize_(model, seed)
    return model.eval()


def save_hf(model: PreTrainedModel, directory: Path, fmt: HFFormat = "safetensors") -> Path:
    """Write ``model`` as an HF checkpoint directory in ``fmt`` and return the directory."""
    if fmt == "sharded":
        model.save_pretrained(directory, max_shard_size="20KB")
        if not (directory / "model.safetensors.index.json").is_file():
            raise AssertionError("expected transformers to write a sharded checkpoint")
    else:
        model.save_pretrained(directory)
    if fmt == "bin":
        # transformers 5 only writes safetensors; a .bin is the same (on-disk named) state dict pickled by torch.
        weights = directory / "model.safetensors"
        state = load_file(str(weights))
        weights.unlink()
        torch.save(state, directory / "pytorch_model.bin")
    return directory


def saved_state_dict(model: PreTrainedModel) -> dict[str, Tensor]:
    """The state dict under the names ``save_pretrained`` writes (transformers 5 renames modules in memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return load_file(str(Path(tmp) / "model.safetensors"))


def hf_to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an HF DeiT/ViT state dict to timm's layout, fusing query/key/value into one ``qkv`` per block."""
    body = {re.sub(r"^(deit|vit)\.", "", k): v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    renames = [
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.distillation_token$", "dist_token"),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
        (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
        (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
        (r"^layernorm\.", "norm."),
        (r"^cls_classifier\.", "head."),
        (r"^classifier\.", "head."),
        (r"^distillation_classifier\.", "head_dist."),
    ]
    for key, value in body.items():
        qkv = re.match(r"^encoder\.layer\.(\d+)\.attention\.attention\.query\.(weight|bias)$", key)
        if qkv:
            layer, kind = qkv.groups()
            base = f"encoder.layer.{layer}.attention.attention"
            parts = [body[f"{base}.{name}.{kind}"] for name in ("query", "key", "value")]
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(parts, dim=0).clone()
            continue
        if re.match(r"^encoder\.layer\.\d+\.attention\.attention\.(key|value)\.", key):
            continue
        for pattern, repl in renames:
            new, count = re.subn(pattern, repl, key)
            if count:
                out[new] = value.clone()
                break
        else:
            raise AssertionError(f"no timm name for {key!r}")
    return out


def save_timm(model: PreTrainedModel, path: Path, wrapping: TimmWrapping = "plain") -> Path:
    """Write ``model`` as a timm/facebookresearch ``.pth``, optionally nested under ``model`` or DDP-prefixed."""
    state = hf_to_timm(saved_state_dict(model))
    if wrapping in ("module", "model_module"):
        state = {f"module.{k}": v for k, v in state.items()}
    payload: dict[str, Any] = state
    if wrapping in ("model", "model_module"):
        payload = {"model": state, "epoch": 299, "args": {"lr": 5e-4}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def edit_config_json(directory: Path, **changes: Any) -> dict[str, Any]:
    """Rewrite fields of a saved ``config.json``; a value of ``None`` removes the field."""
    path = directory / "config.json"
    raw: dict[str, Any] = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw, indent=2))
    return raw


def rewrite_safetensors(directory: Path, state: dict[str, Tensor]) -> Path:
    """Replace a directory's ``model.safetensors`` with ``state``."""
    path = directory / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path
