"""timm / facebookresearch DeiT and DeiT III state dicts → our (HF-named) layout, architecture read from shapes.

Pure ``state_dict → state_dict`` functions; reading files is ``checkpoints.py``'s job. A timm option our model does
not implement is refused with its name rather than loaded into a model that would compute something else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from service.errors import CheckpointError
from service.model.architecture import Architecture, DeiTConfig

_RENAMES = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^dist_token$", "embeddings.distillation_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^blocks\.(\d+)\.ls1\.gamma$", r"encoder.layer.\1.layer_scale1.lambda1"),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^blocks\.(\d+)\.ls2\.gamma$", r"encoder.layer.\1.layer_scale2.lambda1"),
    (r"^norm\.", "layernorm."),
]
_HEADS = {"head.": "cls_classifier.", "head_dist.": "distillation_classifier."}

# Tensors that only exist when a timm VisionTransformer option we do not implement is on.
_UNSUPPORTED = [
    (r"^reg_token$", "register tokens (reg_tokens)"),
    (r"^fc_norm\.", "average-pooled head with its own norm (global_pool='avg', fc_norm)"),
    (r"^attn_pool\.", "attention-pooling head (global_pool='map')"),
    (r"^norm_pre\.", "a LayerNorm before the blocks (pre_norm)"),
    (r"^patch_embed\.norm\.", "a LayerNorm after the patch embedding (embed_norm_layer)"),
    (r"^blocks\.\d+\.attn\.[qk]_norm\.", "query/key normalisation (qk_norm)"),
    (r"^blocks\.\d+\.attn\.norm\.", "a LayerNorm inside attention (scale_attn_norm)"),
    (r"^blocks\.\d+\.mlp\.norm\.", "a LayerNorm inside the MLP (scale_mlp_norm)"),
    (r"^blocks\.\d+\.mlp\.fc1_[gx]\.", "a gated MLP (SwiGLU)"),
    (r"^blocks\.\d+\.norm1_post|^blocks\.\d+\.norm2_post", "post-norm blocks"),
]

# Heads of timm's released DeiT / DeiT III widths; others follow the 64-wide-head convention.
_HEADS_BY_WIDTH = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16}


def is_timm_state_dict(state: Mapping[str, Tensor]) -> bool:
    keys = {k.removeprefix("module.") for k in state}
    return "pos_embed" in keys and "patch_embed.proj.weight" in keys


def unsupported_timm_features(state: Mapping[str, Tensor]) -> list[str]:
    """The timm options a state dict uses that our model lacks (empty when we run it exactly)."""
    found: list[str] = []
    if "cls_token" not in state:
        found.append("no class token (class_token=False)")
    for pattern, feature in _UNSUPPORTED:
        if feature not in found and any(re.match(pattern, k) for k in state):
            found.append(feature)
    if "norm.weight" not in state and "fc_norm.weight" not in state:
        found.append("no final LayerNorm")
    return found


def timm_to_hf(state: Mapping[str, Tensor], num_heads: int | None = None) -> tuple[dict[str, Tensor], DeiTConfig]:
    """A timm/facebookresearch DeiT or DeiT III state dict under our names, with the architecture read from shapes."""
    src = {k.removeprefix("module."): v for k, v in state.items()}
    unsupported = unsupported_timm_features(src)
    if unsupported:
        raise CheckpointError(
            f"timm checkpoint uses features this service does not implement: {'; '.join(unsupported)}"
        )
    config = _config_from_shapes(src, num_heads)
    prefix = config.prefix
    out: dict[str, Tensor] = {}
    for key, value in src.items():
        qkv = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if qkv:
            layer, kind = qkv.groups()
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}encoder.layer.{layer}.attention.attention.{name}.{kind}"] = part.contiguous()
            continue
        head = next((h for h in _HEADS if key.startswith(h)), None)
        if head is not None:
            out[_HEADS[head] + key[len(head) :]] = value
            continue
        for pattern, repl in _RENAMES:
            new, count = re.subn(pattern, repl, key)
            if count:
                out[prefix + new] = value
                break
        else:
            out[key] = value  # left as is: reported as unexpected by the strict load
    if config.architecture is Architecture.SINGLE_HEAD:
        for p in ("weight", "bias"):
            if f"cls_classifier.{p}" in out:
                out[f"classifier.{p}"] = out.pop(f"cls_classifier.{p}")
    return out, config


def _heads_for(hidden: int, num_heads: int | None) -> int:
    if num_heads:
        return num_heads
    if hidden in _HEADS_BY_WIDTH:
        return _HEADS_BY_WIDTH[hidden]
    if hidden % 64 == 0:
        return hidden // 64
    raise CheckpointError(
        f"timm checkpoint of width {hidden} does not say how many attention heads it has "
        "(not a released DeiT width, nor a multiple of 64): pass num_heads"
    )


def _config_from_shapes(src: Mapping[str, Tensor], num_heads: int | None) -> DeiTConfig:
    distilled = "dist_token" in src
    model_type = "deit" if distilled else "vit"
    try:
        hidden = int(src["cls_token"].shape[-1])
        proj = src["patch_embed.proj.weight"]
        patch, channels = int(proj.shape[-1]), int(proj.shape[1])
        positions = int(src["pos_embed"].shape[1])
        layers = len({m.group(1) for k in src if (m := re.match(r"^blocks\.(\d+)\.", k))})
        intermediate = int(src["blocks.0.mlp.fc1.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"timm checkpoint lacks tensor {e.args[0]!r} needed to read its architecture") from e
    prefix_tokens = 2 if distilled else 1
    # DeiT III (no_embed_class) stores positions for the patches only: the count is then itself a square.
    prefix_positions = _is_square(positions - prefix_tokens)
    if not prefix_positions and not _is_square(positions):
        raise CheckpointError(
            f"timm checkpoint's pos_embed has {positions} rows: neither a square patch grid nor one plus "
            f"{prefix_tokens} token(s); a non-square grid is not supported"
        )
    grid = round((positions - prefix_tokens if prefix_positions else positions) ** 0.5)
    if "head.weight" in src:
        arch = Architecture.DISTILLED if distilled else Architecture.SINGLE_HEAD
        num_labels = int(src["head.weight"].shape[0])
    else:
        arch, num_labels = Architecture.BARE, 0
    return DeiTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=_heads_for(hidden, num_heads),
        intermediate_size=intermediate,
        image_size=grid * patch,
        patch_size=patch,
        num_channels=channels,
        layer_norm_eps=1e-6,
        qkv_bias="blocks.0.attn.qkv.bias" in src,
        model_type=model_type,
        architecture=arch,
        layer_scale="blocks.0.ls1.gamma" in src,
        prefix_position_embeddings=prefix_positions,
        id2label={i: f"LABEL_{i}" for i in range(num_labels)},
    )


def _is_square(n: int) -> bool:
    return n > 0 and round(n**0.5) ** 2 == n
