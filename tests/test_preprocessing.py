"""Preprocessing equals transformers' DeiT image processor; decoding refuses what it cannot or should not read."""

from __future__ import annotations

import io
import json
import random
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from PIL import Image
from skimage import data as skdata
from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil

from service.errors import EmptyUpload, ImageTooLarge, InvalidImage, UnsupportedMediaType
from service.model.decoding import decode_image, to_rgb
from service.model.preprocessing import PreprocessConfig, Preprocessor

ATOL = 1e-5
MAX_PIXELS = 40_000_000
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}

# preprocessor_config.json as the released checkpoints and older/other writers spell it.
CONFIGS: dict[str, dict[str, Any]] = {
    "released-224": {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "DeiTFeatureExtractor",
        "resample": 3,
        "size": 256,
        **IMAGENET,
    },
    "released-384": {"size": 438, "crop_size": 384, "resample": 3, **IMAGENET},
    "dict-size": {
        "image_processor_type": "DeiTImageProcessor",
        "size": {"height": 256, "width": 256},
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        **IMAGENET,
    },
    "rectangular": {"size": {"height": 200, "width": 320}, "crop_size": {"height": 160, "width": 288}, **IMAGENET},
    "shortest-edge": {"size": {"shortest_edge": 256}, "crop_size": 224, **IMAGENET},
    "bilinear-no-crop": {"size": 96, "resample": 2, "do_center_crop": False, **IMAGENET},
    "no-normalize": {"do_normalize": False, "size": 64, "crop_size": 48},
    "empty": {},
    "partial": {"size": 300, "image_mean": [0.4, 0.5, 0.6]},
}


def _sample(name: str) -> NDArray[np.uint8]:
    """One of scikit-image's bundled photos (shipped with the package, so no network)."""
    pixels: NDArray[np.uint8] = getattr(skdata, name)()
    return pixels


def _photos() -> dict[str, Callable[[], Image.Image]]:
    return {
        "astronaut": lambda: Image.fromarray(_sample("astronaut")),
        "chelsea": lambda: Image.fromarray(_sample("chelsea")),
        "coffee": lambda: Image.fromarray(_sample("coffee")),
        "rocket": lambda: Image.fromarray(_sample("rocket")),
        "camera-gray": lambda: Image.fromarray(_sample("camera")).convert("RGB"),
        "tiny": lambda: Image.fromarray(np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)),
    }


def _hf_processor(directory: Path, raw: dict[str, Any]) -> DeiTImageProcessorPil:
    (directory / "preprocessor_config.json").write_text(json.dumps(raw))
    return DeiTImageProcessorPil.from_pretrained(directory)


def _reference(processor: DeiTImageProcessorPil, image: Image.Image, **kwargs: Any) -> torch.Tensor:
    return processor(image, return_tensors="pt", **kwargs).pixel_values[0]


def _ours(directory: Path, image: Image.Image) -> torch.Tensor:
    return Preprocessor(PreprocessConfig.from_directory(directory, default_size=224))(image)


def _max_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape
    assert ours.dtype == torch.float32
    return (ours - reference).abs().max().item()


@pytest.mark.parametrize("photo", list(_photos()))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers_processor(name: str, photo: str, tmp_path: Path) -> None:
    raw = CONFIGS[name]
    image = _photos()[photo]()
    reference = _reference(_hf_processor(tmp_path, raw), image)
    assert reference.std() > 0.1
    diff = _max_diff(_ours(tmp_path, image), reference)
    print(f"preprocessing {name}/{photo}: max |ours - transformers| = {diff:.2e}")
    assert diff < ATOL


def test_missing_fields_take_the_processor_defaults() -> None:
    cfg = PreprocessConfig.from_dict({})
    assert (cfg.resize_height, cfg.resize_width, cfg.crop_height, cfg.crop_width) == (256, 256, 224, 224)
    assert cfg.resample == 3
    assert cfg.rescale_factor == pytest.approx(1 / 255)
    assert cfg.image_mean == cfg.image_std == (0.5, 0.5, 0.5)


def test_output_size_follows_crop() -> None:
    cfg = PreprocessConfig.from_dict(CONFIGS["released-384"])
    assert cfg.output_size == (384, 384)
    assert Preprocessor(cfg)(Image.fromarray(_sample("chelsea"))).shape == (3, 384, 384)


# --- image modes ----------------------------------------------------------------------------------------------


def _alpha_ramp(size: tuple[int, int]) -> Image.Image:
    width, height = size
    ramp = np.linspace(0, 255, width, dtype=np.float64)[None, :].repeat(height, axis=0)
    return Image.fromarray(ramp.astype(np.uint8), mode="L")


def _with_alpha(image: Image.Image, mode: str) -> Image.Image:
    base = image.convert(mode[:-1] if mode != "RGBA" else "RGB")
    out = base.convert(mode)
    out.putalpha(_alpha_ramp(image.size))
    return out


def _palette_with_transparency(image: Image.Image) -> Image.Image:
    paletted = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    counts = np.bincount(np.asarray(paletted).ravel())
    paletted.info["transparency"] = int(counts.argmax())
    return paletted


MODES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "L": lambda im: im.convert("L"),
    "LA": lambda im: _with_alpha(im, "LA"),
    "RGBA": lambda im: _with_alpha(im, "RGBA"),
    "P-transparency": _palette_with_transparency,
    "P": lambda im: im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
    "CMYK": lambda im: im.convert("CMYK"),
    "1": lambda im: im.convert("1"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_modes_match_transformers_rgb_conversion(mode: str, tmp_path: Path) -> None:
    image = MODES[mode](Image.fromarray(_sample("chelsea")))
    processor = _hf_processor(tmp_path, CONFIGS["released-224"])
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.size == image.size
    reference = _reference(processor, image, do_convert_rgb=True)
    diff = _max_diff(_ours(tmp_path, rgb), reference)
    print(f"preprocessing mode {mode}: max |ours - transformers| = {diff:.2e}")
    assert diff < ATOL


@pytest.mark.parametrize("mode", ["LA", "RGBA", "P-transparency"])
def test_transparency_is_composited_on_white(mode: str) -> None:
    image = MODES[mode](Image.fromarray(_sample("chelsea")))
    composited = np.asarray(to_rgb(image))
    dropped_alpha = np.asarray(image.convert("RGB"))
    assert not np.array_equal(composited, dropped_alpha), "transparency should change the pixels"
    alpha = np.asarray(image.convert("RGBA"))[..., 3]
    assert (alpha == 0).any()
    assert (composited[alpha == 0] == 255).all()


def test_sixteen_bit_grayscale_scales_to_eight_bits(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 300 * 400).reshape(300, 400).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    rgb = np.asarray(to_rgb(image))
    expected = np.rint(values / 257).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)
    assert (rgb.min(), rgb.max()) == (0, 255)
    processor = _hf_processor(tmp_path, CONFIGS["released-224"])
    reference = _reference(processor, Image.fromarray(expected, mode="L"), do_convert_rgb=True)
    assert _max_diff(_ours(tmp_path, to_rgb(image)), reference) < ATOL


def test_sixteen_bit_image_holding_8_bit_values_is_not_darkened() -> None:
    values: NDArray[np.uint16] = np.arange(256, dtype=np.uint16).reshape(16, 16).repeat(2, axis=0)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    np.testing.assert_array_equal(rgb[..., 1], values.astype(np.uint8))


# --- decoding -------------------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def test_png_decodes_to_the_same_pixels() -> None:
    source = _sample("coffee")
    decoded = decode_image(_encode(Image.fromarray(source), "PNG"), MAX_PIXELS)
    assert decoded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded), source)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    jpeg = _encode(Image.fromarray(_sample("chelsea")), "JPEG", quality=95, exif=exif)
    decoded = decode_image(jpeg, MAX_PIXELS)
    stored = Image.open(io.BytesIO(jpeg)).convert("RGB")
    assert stored.size == (451, 300)
    assert decoded.size == (300, 451)
    upright = stored.transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(upright))
    processor = _hf_processor(tmp_path, CONFIGS["released-224"])
    reference = _reference(processor, upright)
    assert _max_diff(_ours(tmp_path, decoded), reference) < ATOL
    assert _max_diff(_ours(tmp_path, stored), reference) > 0.5


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    photo = Image.fromarray(_sample("chelsea")).resize((120, 80))
    frames = [photo, photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM), photo.rotate(180)]
    gif = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    opened = Image.open(io.BytesIO(gif))
    assert getattr(opened, "n_frames", 1) == 3
    first_frame = opened.convert("RGB")
    decoded = decode_image(gif, MAX_PIXELS)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(first_frame))
    processor = _hf_processor(tmp_path, CONFIGS["released-224"])
    assert _max_diff(_ours(tmp_path, decoded), _reference(processor, first_frame)) < ATOL
    opened.seek(1)
    assert not np.array_equal(np.asarray(decoded), np.asarray(opened.convert("RGB")))


def test_empty_upload() -> None:
    with pytest.raises(EmptyUpload):
        decode_image(b"", MAX_PIXELS)


def test_random_bytes_are_not_an_image() -> None:
    noise = random.Random(0).randbytes(4096)
    with pytest.raises(UnsupportedMediaType):
        decode_image(noise, MAX_PIXELS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_invalid(fmt: str) -> None:
    encoded = _encode(Image.fromarray(_sample("astronaut")), fmt)
    with pytest.raises(InvalidImage):
        decode_image(encoded[: len(encoded) // 2], MAX_PIXELS)


def _one_bit_png(width: int, height: int) -> bytes:
    """An all-black 1-bit PNG: a few kilobytes that would decode to ``width``×``height`` pixels."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    rows_per_chunk = 1000
    block = row * rows_per_chunk
    parts = [compressor.compress(block) for _ in range(height // rows_per_chunk)]
    parts.append(compressor.compress(row * (height % rows_per_chunk)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """900 megapixels in about 100 kB."""
    return _one_bit_png(30_000, 30_000)


@pytest.mark.parametrize("max_pixels", [MAX_PIXELS, 10**12])
def test_decompression_bomb_is_refused_without_warnings(bomb_png: bytes, max_pixels: int) -> None:
    assert len(bomb_png) < 200_000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageTooLarge):
            decode_image(bomb_png, max_pixels)
    assert caught == []


def test_image_over_pil_warning_threshold_is_refused_without_warnings() -> None:
    """Between PIL's warning and error thresholds PIL only warns; we still refuse, and nothing escapes."""
    png = _one_bit_png(10_000, 10_000)
    assert Image.MAX_IMAGE_PIXELS is not None
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 10_000 < 2 * Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageTooLarge):
            decode_image(png, 10**12)
    assert caught == []


def test_pixel_limit_applies_before_decoding() -> None:
    png = _one_bit_png(300, 200)
    assert decode_image(png, 60_000).size == (300, 200)
    with pytest.raises(ImageTooLarge, match="300×200"):
        decode_image(png, 59_999)
