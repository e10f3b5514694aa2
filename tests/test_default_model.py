"""The embedded default model keeps the promises its model card makes, so ``deit-serve`` with no arguments is honest."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor

from harness.inputs import training_script
from service.model.checkpoints import LoadedCheckpoint, load_checkpoint
from service.model.decoding import decode_image
from service.model.preprocessing import Preprocessor

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "service" / "data" / "model_store" / "deit-tiny-digits"
MAX_BYTES = 5 * 1024 * 1024
MAX_PIXELS = 40_000_000
TOLERANCE_PERCENT = 0.5


@functools.cache
def _checkpoint(dtype: str) -> LoadedCheckpoint:
    return load_checkpoint(MODEL_DIR, device="cpu", dtype=dtype)


def _card_accuracy(row: str) -> float:
    """The percentage the model card states in its accuracy table for ``row``."""
    card = (MODEL_DIR / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^\| {re.escape(row)} \| ([0-9.]+)% \(\d+/\d+\) \|$", card, flags=re.MULTILINE)
    assert match is not None, f"model card has no accuracy row {row!r}"
    return float(match.group(1))


def _held_out(checkpoint: LoadedCheckpoint) -> tuple[Tensor, Tensor]:
    module = training_script()
    return module.held_out_inputs(module.held_out_split(), Preprocessor(checkpoint.preprocess))


def _percent_correct(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * (logits.argmax(dim=1) == labels).sum().item() / len(labels)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_samples_are_classified_as_their_file_names_say(dtype: str) -> None:
    checkpoint = _checkpoint(dtype)
    preprocessor = Preprocessor(checkpoint.preprocess)
    samples = sorted((MODEL_DIR / "samples").glob("*.png"))
    expected = [path.name.split("_", 1)[0] for path in samples]
    assert sorted(expected) == checkpoint.labels, "one sample per class"
    pixels = torch.stack([preprocessor(decode_image(path.read_bytes(), MAX_PIXELS)) for path in samples])
    with torch.inference_mode():
        logits = checkpoint.model(pixels)
    predicted = [checkpoint.labels[i] for i in logits.argmax(dim=1).tolist()]
    assert dict(zip([p.name for p in samples], predicted, strict=True)) == dict(
        zip([p.name for p in samples], expected, strict=True)
    )


def test_model_card_accuracy_is_reproduced_on_the_held_out_split() -> None:
    checkpoint = _checkpoint("float32")
    assert checkpoint.preprocess == training_script().PREPROCESS, "shipped preprocessing differs from training's"
    inputs, labels = _held_out(checkpoint)
    with torch.inference_mode():
        averaged = checkpoint.model(inputs)
        cls_logits, dist_logits = checkpoint.model.head_logits(inputs)
    measured = {
        "averaged heads (served)": _percent_correct(averaged, labels),
        "CLS head": _percent_correct(cls_logits, labels),
        "distillation head": _percent_correct(dist_logits, labels),
    }
    print(f"default model held-out accuracy: {measured}")
    for row, percent in measured.items():
        assert percent == pytest.approx(_card_accuracy(row), abs=TOLERANCE_PERCENT), row
    assert measured["averaged heads (served)"] >= 95.0


def test_model_directory_stays_small() -> None:
    size = sum(path.stat().st_size for path in MODEL_DIR.rglob("*") if path.is_file())
    assert size < MAX_BYTES, f"{MODEL_DIR} holds {size} bytes"


def test_transformers_loads_it_and_agrees() -> None:
    from transformers import DeiTForImageClassificationWithTeacher
    from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil

    checkpoint = _checkpoint("float32")
    reference = DeiTForImageClassificationWithTeacher.from_pretrained(MODEL_DIR, attn_implementation="eager").eval()
    inputs, _ = _held_out(checkpoint)
    inputs = inputs[:64]
    with torch.inference_mode():
        ours = checkpoint.model(inputs)
        theirs = reference(pixel_values=inputs).logits
    assert reference.config.id2label == checkpoint.config.id2label
    diff = (ours - theirs).abs().max().item()
    print(f"default model: max |ours - transformers| = {diff:.2e}")
    assert diff < 1e-4

    processor = DeiTImageProcessorPil.from_pretrained(MODEL_DIR)
    preprocessor = Preprocessor(checkpoint.preprocess)
    images = [decode_image(path.read_bytes(), MAX_PIXELS) for path in sorted((MODEL_DIR / "samples").glob("*.png"))]
    expected = processor(images, return_tensors="pt")["pixel_values"]
    assert (torch.stack([preprocessor(image) for image in images]) - expected).abs().max().item() < 1e-5
