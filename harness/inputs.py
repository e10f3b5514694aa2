"""Inputs the tests and the benchmarks both use: a tiny checkpoint, the reference decode, the demo model's training
script."""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from harness.launcher import REPO


def write_tiny_model(directory: Path, num_labels: int = 10, image_size: int = 32, seed: int = 0) -> Path:
    """A random-weight distilled DeiT in HF format, written by transformers itself, with a preprocessor config."""
    import torch
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(seed)
    labels = {i: f"class_{i}" for i in range(num_labels)}
    config = DeiTConfig(
        image_size=image_size,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    DeiTForImageClassificationWithTeacher(config).eval().save_pretrained(directory)
    preprocess = {"size": image_size + 4, "crop_size": image_size, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocess))
    return directory


def pillow_decode(data: bytes) -> torch.Tensor:
    """Pillow's decode of the stored pixels (not turned upright), as nvJPEG returns them: [3, H, W] uint8 RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


@functools.cache
def training_script() -> ModuleType:
    """scripts/train_default_model.py as a module: its held-out split and rendering are the very ones the demo
    model's card was made with."""
    path = REPO / "scripts" / "train_default_model.py"
    spec = importlib.util.spec_from_file_location("train_default_model", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
