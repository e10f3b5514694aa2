"""Write the TensorFlow ``tf_model.h5`` fixtures under tests/fixtures/tf/, with TensorFlow's own outputs.

TensorFlow is never a dependency of the service or its tests: this script runs in a venv of its own, once, and
its output is committed. transformers 5 removed the TF classes, so the venv pins transformers 4.x:

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install "transformers==4.57.6" "tensorflow==2.20.*" "tf-keras==2.20.*" h5py safetensors
    /tmp/tfvenv/bin/python scripts/make_tf_fixtures.py

For each kind it writes ``<kind>/tf_model.h5`` and ``config.json`` (``save_pretrained``), ``outputs.npz`` (the seeded
input and the TF model's outputs for it) and ``pytorch/`` (the same weights as ``model.safetensors`` under the names
transformers' own TF→PyTorch conversion gives them, with that config).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # transformers 4.x TF models need Keras 2 (tf-keras)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
import transformers
from safetensors.numpy import save_file
from transformers.modeling_tf_pytorch_utils import (  # type: ignore[import-not-found]  # transformers < 5 only
    TransposeType,
    convert_tf_weight_name_to_pt_weight_name,
)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tf"

# transformers' own DeiT unit-test shapes: every code path, a few KB of weights.
TINY: dict[str, Any] = {
    "image_size": 30,
    "patch_size": 2,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "encoder_stride": 2,
}
NUM_LABELS = 5

KINDS: dict[str, tuple[str, str]] = {
    # kind: (TF class, config class)
    "deit_with_teacher": ("TFDeiTForImageClassificationWithTeacher", "DeiTConfig"),
    "deit_classifier": ("TFDeiTForImageClassification", "DeiTConfig"),
    "deit_model": ("TFDeiTModel", "DeiTConfig"),
    "vit_classifier": ("TFViTForImageClassification", "ViTConfig"),
}


def randomize(model: Any, seed: int) -> None:
    """Random values for every variable: TF initialises the tokens, positions and biases to zero, hiding bugs."""
    rng = np.random.default_rng(seed)
    for var in model.weights:
        noise = rng.standard_normal(var.shape).astype(np.float32)
        name = var.name
        if "layernorm" in name and name.endswith("gamma:0"):
            var.assign(1.0 + 0.2 * noise)
        else:
            var.assign(0.3 * noise)


def pytorch_twin(model: Any, directory: Path, config_path: Path) -> None:
    """The same weights under transformers' own TF→PyTorch names and layouts, as ``model.safetensors``."""
    base = model.base_model_prefix
    has_base = any(w.name.split("/")[1] == base for w in model.weights if "/" in w.name)
    tensors: dict[str, np.ndarray] = {}
    for var in model.weights:
        name, transpose = convert_tf_weight_name_to_pt_weight_name(
            var.name, start_prefix_to_remove="" if has_base else f"{base}.", tf_weight_shape=var.shape
        )
        value = var.numpy()
        if transpose is TransposeType.CONV2D:
            value = np.transpose(value, (3, 2, 0, 1))
        elif transpose is TransposeType.SIMPLE:
            value = value.T
        elif transpose is not TransposeType.NO:
            raise AssertionError(f"unexpected transpose {transpose} for {var.name}")
        tensors[name] = np.ascontiguousarray(value, dtype=np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(config_path, directory / "config.json")


def make(kind: str, tf_class: str, config_class: str, seed: int) -> None:
    config = getattr(transformers, config_class)(num_labels=NUM_LABELS, **TINY)
    config.id2label = {i: f"class_{i}" for i in range(NUM_LABELS)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    model = getattr(transformers, tf_class)(config)
    rng = np.random.default_rng(1000 + seed)
    size = TINY["image_size"]
    pixel_values = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    model(pixel_values)  # builds the variables
    randomize(model, seed)
    outputs = model(pixel_values, training=False)
    arrays: dict[str, Any] = {"pixel_values": pixel_values}
    for field in ("logits", "cls_logits", "distillation_logits", "last_hidden_state", "pooler_output"):
        value = getattr(outputs, field, None)
        if value is not None:
            arrays[field] = value.numpy()
    directory = OUT / kind
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory, safe_serialization=False)
    np.savez_compressed(directory / "outputs.npz", **arrays)
    pytorch_twin(model, directory / "pytorch", directory / "config.json")
    sizes = {p.name: p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    print(kind, tf_class, sizes)


def main() -> int:
    print(f"tensorflow {tf.__version__}, transformers {transformers.__version__}")
    tf.random.set_seed(0)
    for seed, (kind, (tf_class, config_class)) in enumerate(KINDS.items()):
        make(kind, tf_class, config_class, seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
