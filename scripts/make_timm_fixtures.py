"""Write the timm fixtures under tests/fixtures/timm/, with timm's own outputs.

timm imports torchvision, whose wheels here are built for another torch than the service's, so this script runs in
a venv of its own, once, and its output is committed (nothing is downloaded: every model has random weights):

    python3 -m venv /tmp/timmvenv
    /tmp/timmvenv/bin/pip install "timm==1.0.31" safetensors     # pulls torch 2.14 + torchvision 0.29
    /tmp/timmvenv/bin/python scripts/make_timm_fixtures.py

It writes
- ``full_size_keys.json``: for every timm DeiT / DeiT III variant at full size, each tensor's name and shape and the
  variant's head count, image size and class (models built on the ``meta`` device, so no weights exist);
- ``<name>.pth`` + ``<name>.npz``: tiny random-weight models of each structure we run (``torch.save`` of the state
  dict), and timm's ``forward_features`` / pre-logits / logits for a seeded input;
- ``refused/<feature>.pth``: tiny models with a timm feature our model does not have, which must be refused.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "timm"

# Tiny overrides that keep each variant's structure (patch 16, tokens, heads layout, layer scale) but few weights.
TINY: dict[str, Any] = {"img_size": 32, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 10}

PARITY: dict[str, tuple[str, dict[str, Any]]] = {
    # fixture name: (timm model name, overrides on top of TINY)
    "deit_tiny_patch16_224": ("deit_tiny_patch16_224", {}),
    "deit_tiny_distilled_patch16_224": ("deit_tiny_distilled_patch16_224", {}),
    "deit_base_distilled_patch16_384": ("deit_base_distilled_patch16_384", {"img_size": 48}),
    "deit3_small_patch16_224": ("deit3_small_patch16_224", {}),
    "deit3_small_patch16_384": ("deit3_small_patch16_384", {"img_size": 48}),
    "deit_tiny_distilled_patch16_224_backbone": ("deit_tiny_distilled_patch16_224", {"num_classes": 0}),
    "deit3_small_patch16_224_backbone": ("deit3_small_patch16_224", {"num_classes": 0}),
}

# timm options our model does not implement; a checkpoint using one must be refused, never run.
REFUSED: dict[str, tuple[str, dict[str, Any]]] = {
    "qk_norm": ("deit3_small_patch16_224", {"qk_norm": True}),
    "reg_tokens": ("deit3_small_patch16_224", {"reg_tokens": 2}),
    "fc_norm": ("deit_small_patch16_224", {"global_pool": "avg"}),
    "norm_pre": ("deit_small_patch16_224", {"pre_norm": True}),
    "attn_pool": ("deit_small_patch16_224", {"global_pool": "map"}),
    "scale_mlp_norm": ("deit3_small_patch16_224", {"scale_mlp_norm": True}),
    "no_class_token": ("deit_small_patch16_224", {"class_token": False, "global_pool": "avg", "fc_norm": False}),
}
REFUSED_TINY: dict[str, Any] = {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2,
                                "num_classes": 3}  # fmt: skip


def randomize_(model: nn.Module, seed: int) -> None:
    """Random values everywhere: timm starts tokens near zero and layer scale at 1e-6, which would hide bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm_weight = name.endswith(".weight") and param.ndim == 1 and "norm" in name
            if is_norm_weight or name.endswith(".gamma"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.3 * noise)


def full_size_manifest() -> dict[str, Any]:
    manifest: dict[str, Any] = {}
    for name in timm.list_models("deit*"):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        manifest[name] = {
            "class": type(model).__name__,
            "num_heads": model.blocks[0].attn.num_heads,
            "img_size": list(model.patch_embed.img_size),
            "layer_norm_eps": model.norm.eps,
            "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
        }
    return manifest


def write_parity(name: str, timm_name: str, overrides: dict[str, Any], seed: int) -> None:
    model = timm.create_model(timm_name, pretrained=False, **{**TINY, **overrides}).eval()
    randomize_(model, seed)
    size = model.patch_embed.img_size[0]
    pixel_values = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(100 + seed))
    with torch.inference_mode():
        features = model.forward_features(pixel_values)
        pre_logits = model.forward_head(features, pre_logits=True)
        logits = model(pixel_values)
    torch.save(model.state_dict(), OUT / f"{name}.pth")
    np.savez_compressed(
        OUT / f"{name}.npz",
        pixel_values=pixel_values.numpy(),
        features=features.numpy(),
        pre_logits=pre_logits.numpy(),
        logits=logits.numpy(),
        num_heads=np.array(model.blocks[0].attn.num_heads),
    )
    print(name, type(model).__name__, tuple(logits.shape), (OUT / f"{name}.pth").stat().st_size, "bytes")


def write_refused(feature: str, timm_name: str, overrides: dict[str, Any], seed: int) -> None:
    model = timm.create_model(timm_name, pretrained=False, **{**REFUSED_TINY, **overrides}).eval()
    randomize_(model, seed)
    torch.save(model.state_dict(), OUT / "refused" / f"{feature}.pth")


def main() -> int:
    print(f"timm {timm.__version__}, torch {torch.__version__}")
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "refused").mkdir(parents=True)
    manifest = full_size_manifest()
    (OUT / "full_size_keys.json").write_text(json.dumps(manifest, separators=(",", ":"), sort_keys=True) + "\n")
    for seed, (name, (timm_name, overrides)) in enumerate(PARITY.items()):
        write_parity(name, timm_name, overrides, seed)
    for seed, (feature, (timm_name, overrides)) in enumerate(REFUSED.items()):
        write_refused(feature, timm_name, overrides, 50 + seed)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{len(manifest)} full-size variants; {total} bytes under {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
