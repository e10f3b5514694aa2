"""Benchmark inputs: random-weight DeiT checkpoints written by transformers, and JPEG photos at fixed sizes.

Everything is written once into a cache directory (``$DEIT_BENCH_CACHE``, default ``<tmp>/deit-serve-bench``) and
reused by later runs; a checkpoint is identified by its variant and seed, a photo set by its size and quality.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from service.model.checkpoints import imagenet_labels
from service.model.preprocessing import PreprocessConfig


@dataclass(frozen=True)
class Variant:
    name: str
    hidden_size: int
    num_heads: int
    num_layers: int = 12


VARIANTS = {
    "tiny": Variant("tiny", 192, 3),
    "small": Variant("small", 384, 6),
    "base": Variant("base", 768, 12),
}

# Colour photos bundled with scikit-image (no download): a portrait, a cat, food, a launch pad, a motorcycle,
# and a microscope slide.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "immunohistochemistry")
IMAGE_SIZES = {"640x480": (640, 480), "1920x1080": (1920, 1080)}

# The released facebook/deit-*-distilled-patch16-224 preprocessor_config.json values.
RELEASED_PREPROCESS = PreprocessConfig(
    resize_height=256,
    resize_width=256,
    resample=3,
    crop_height=224,
    crop_width=224,
    image_mean=(0.485, 0.456, 0.406),
    image_std=(0.229, 0.224, 0.225),
)


def cache_dir() -> Path:
    root = Path(os.environ.get("DEIT_BENCH_CACHE") or Path(tempfile.gettempdir()) / "deit-serve-bench")
    root.mkdir(parents=True, exist_ok=True)
    return root


def checkpoint(variant: str, seed: int = 0) -> Path:
    """Directory of a distilled DeiT (``DeiTForImageClassificationWithTeacher``) with random weights.

    Inside the directory is a one-model store layout: ``<dir>/store/deit-<variant>`` is the HF checkpoint, so the
    store directory can be handed to ``deit-serve`` as is.
    """
    v = VARIANTS[variant]
    store = cache_dir() / f"deit-{variant}-seed{seed}" / "store"
    model_dir = store / f"deit-{variant}"
    if (model_dir / "preprocessor_config.json").is_file():
        return model_dir
    import torch
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(seed)
    labels = dict(enumerate(imagenet_labels()))
    config = DeiTConfig(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        intermediate_size=4 * v.hidden_size,
        image_size=224,
        patch_size=16,
        num_labels=len(labels),
        id2label=labels,
        label2id={name: i for i, name in labels.items()},
    )
    partial = model_dir.with_name(model_dir.name + ".partial")
    DeiTForImageClassificationWithTeacher(config).eval().save_pretrained(partial)
    (partial / "preprocessor_config.json").write_text(json.dumps(RELEASED_PREPROCESS.to_dict(), indent=2))
    partial.rename(model_dir)
    return model_dir


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photos(size: str, quality: int = 90) -> list[bytes]:
    """The sample photos cover-resized (bicubic) and center-cropped to ``size``, as baseline JPEGs."""
    width, height = IMAGE_SIZES[size]
    directory = cache_dir() / f"photos-{size}-q{quality}"
    files = [directory / f"{name}.jpg" for name in PHOTOS]
    if all(f.is_file() for f in files):
        return [f.read_bytes() for f in files]
    import skimage.data

    directory.mkdir(parents=True, exist_ok=True)
    for name, path in zip(PHOTOS, files, strict=True):
        pixels = getattr(skimage.data, name)()
        if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
            pixels = pixels[0]
        image = Image.fromarray(pixels).convert("RGB")
        scale = max(width / image.width, height / image.height)
        resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        path.write_bytes(jpeg(resized.crop((left, top, left + width, top + height)), quality))
    return [f.read_bytes() for f in files]


def peaked_checkpoint(variant: str, scale: float = 40.0, seed: int = 0) -> Path:
    """``checkpoint(variant)`` with both heads' weights and biases multiplied by ``scale``.

    Random weights give almost uniform probabilities, where any perturbation flips the top-1; a trained model is
    confident on most inputs. Scaling the heads makes the random model's answers peaked the same way, so top-1
    agreement and probability differences under quantization mean what they mean for a trained model.
    """
    source = checkpoint(variant, seed)
    store = cache_dir() / f"deit-{variant}-seed{seed}-peaked{scale:g}" / "store"
    model_dir = store / f"deit-{variant}"
    if (model_dir / "preprocessor_config.json").is_file():
        return model_dir
    from transformers import DeiTForImageClassificationWithTeacher

    model = DeiTForImageClassificationWithTeacher.from_pretrained(source).eval()
    for head in (model.cls_classifier, model.distillation_classifier):
        head.weight.data.mul_(scale)
        head.bias.data.mul_(scale)
    partial = model_dir.with_name(model_dir.name + ".partial")
    model.save_pretrained(partial)
    (partial / "preprocessor_config.json").write_text((source / "preprocessor_config.json").read_text())
    partial.rename(model_dir)
    return model_dir
