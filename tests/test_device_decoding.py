"""The GPU decoding path (``--preprocess-device cuda``) on any machine: which uploads and models it takes, and the
arithmetic after nvJPEG (orientation, resize, crop, normalize), which is plain torch, against the CPU path.

Here the device is the CPU and Pillow's JPEG decoder stands in for nvJPEG, so what is compared is exactly what runs
after the decode; nvJPEG itself is compared on CUDA in ``test_cuda_parity.py`` and ``benchmarks/device_decoding.py``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torch import Tensor

from harness.inputs import pillow_decode
from service.engine.runner import default_forward_workers
from service.errors import CheckpointError, ImageTooLarge
from service.model.decoding import load_rgb, open_image
from service.model.device_decoding import (
    Decode,
    DeviceDecoding,
    TensorPreprocessor,
    center_crop,
    device_decoding_for,
    image_refusal,
    model_refusal,
    upright,
)
from service.model.preprocessing import PreprocessConfig, Preprocessor
from service.settings import Settings
from tests.serving import failed_start, write_tiny_model

CPU = torch.device("cpu")
MAX_PIXELS = 40_000_000


def _photo(width: int, height: int) -> Image.Image:
    return Image.fromarray(skdata.astronaut()).resize((width, height), Image.Resampling.LANCZOS)  # type: ignore[no-untyped-call]


def _jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def _in_8bit_units(a: Tensor, b: Tensor, preprocessor: Preprocessor) -> Tensor:
    return (a - b).abs() / preprocessor.scales.view(3, 1, 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_pixels_as_exif_transpose_does(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(_photo(64, 40), exif=exif.tobytes())
    expected = np.asarray(load_rgb(*open_image(data, MAX_PIXELS)))
    turned = upright(pillow_decode(data), orientation).permute(1, 2, 0).numpy()
    assert turned.shape == expected.shape
    assert np.array_equal(turned, expected)


@pytest.mark.parametrize(("size", "crop"), [((300, 260), (224, 224)), ((100, 50), (224, 224)), ((9, 300), (16, 8))])
def test_center_crop_takes_the_cpu_paths_offsets_and_padding(size: tuple[int, int], crop: tuple[int, int]) -> None:
    cfg = PreprocessConfig(do_resize=False, crop_height=crop[0], crop_width=crop[1], do_normalize=False)
    image = _photo(*size)
    preprocessor = Preprocessor(cfg)
    cropped = center_crop(torch.from_numpy(np.array(image)).permute(2, 0, 1), *crop)
    assert torch.equal(cropped.float().mul(preprocessor.scales.view(3, 1, 1)), preprocessor(image))


# Largest and mean distance to the CPU path, in 8-bit units, measured here: PIL resizes in fixed point, torch in
# float; both round each pass to 8 bits. Tall strips shrunk ~8× vertically differ most.
CASES = {
    "bicubic 640×480": (PreprocessConfig(), (640, 480), 1, 0.001),
    "bicubic 1920×1080": (PreprocessConfig(), (1920, 1080), 1, 0.001),
    "bicubic upscale 100×50": (PreprocessConfig(), (100, 50), 1, 0.001),
    "bicubic 256×256: crop only": (PreprocessConfig(), (256, 256), 0, 0.0),
    "bicubic tall strip 300×2000": (PreprocessConfig(), (300, 2000), 6, 0.35),
    "shortest edge 640×480": (PreprocessConfig(shortest_edge=224), (640, 480), 1, 0.001),
    "bilinear 640×480": (PreprocessConfig(resample=2), (640, 480), 1, 0.02),
    "nearest 640×480": (PreprocessConfig(resample=0), (640, 480), 0, 0.0),
    "no crop, rectangular": (PreprocessConfig(resize_height=200, resize_width=320, do_center_crop=False), (640, 480),
                             1, 0.005),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_tensor_preprocessing_is_within_rounding_of_the_cpu_path(case: str) -> None:
    cfg, size, max_diff, mean_diff = CASES[case]
    preprocessor = Preprocessor(cfg)
    image = _photo(*size)
    expected = preprocessor(image)
    got = TensorPreprocessor(preprocessor, CPU)(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    diff = _in_8bit_units(got, expected, preprocessor)
    assert diff.max().item() <= max_diff + 1e-3
    assert diff.mean().item() <= mean_diff


def test_tensor_preprocessing_refuses_an_extreme_aspect_ratio_as_the_cpu_path_does() -> None:
    preprocessor = Preprocessor(PreprocessConfig(shortest_edge=256))
    strip = torch.zeros(3, 1, 300_000, dtype=torch.uint8)
    with pytest.raises(ImageTooLarge, match="aspect ratio is too extreme"):
        TensorPreprocessor(preprocessor, CPU)(strip)


def test_models_whose_resize_filter_torch_lacks_stay_on_the_cpu() -> None:
    assert model_refusal(PreprocessConfig()) is None
    assert model_refusal(PreprocessConfig(resample=2)) is None
    for number, name in ((1, "lanczos"), (4, "box"), (5, "hamming")):
        assert (
            model_refusal(PreprocessConfig(resample=number)) == f"its resize filter ({name}) has no equivalent in torch"
        )
    assert model_refusal(PreprocessConfig(resample=1, do_resize=False)) is None  # the filter is never used
    with pytest.raises(ValueError, match="lanczos"):
        TensorPreprocessor(Preprocessor(PreprocessConfig(resample=1)), CPU)


def _refusal(data: bytes) -> str | None:
    return image_refusal(open_image(data, MAX_PIXELS)[0], data)


def test_only_baseline_rgb_and_grey_jpegs_take_the_device_path() -> None:
    photo = _photo(64, 48)
    png = io.BytesIO()
    photo.save(png, format="PNG")
    assert _refusal(_jpeg(photo)) is None
    assert _refusal(_jpeg(photo.convert("L"))) is None
    assert _refusal(png.getvalue()) == "a PNG image"
    assert _refusal(_jpeg(photo.convert("CMYK"))) == "a CMYK JPEG"
    assert _refusal(_jpeg(photo, progressive=True)) == "a progressive or arithmetic-coded JPEG"
    truncated = _jpeg(_photo(640, 480))[:-300]
    assert _refusal(truncated) == "a JPEG without its end-of-image marker (truncated?)"
    assert _refusal(_jpeg(photo) + b"\0" * 100) is None  # zero padding after the end of the image


def _decoding(cfg: PreprocessConfig, decode: Decode = pillow_decode) -> tuple[Preprocessor, DeviceDecoding]:
    preprocessor = Preprocessor(cfg)
    return preprocessor, DeviceDecoding(preprocessor, CPU, decode)


def test_device_decoding_of_an_upload_matches_the_cpu_path() -> None:
    preprocessor, decoding = _decoding(PreprocessConfig())
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone photo held upright
    for data in (_jpeg(_photo(640, 480)), _jpeg(_photo(640, 480), exif=exif.tobytes()), _jpeg(_photo(80, 60))):
        got = decoding(open_image(data, MAX_PIXELS)[0], data)
        assert got is not None
        expected = preprocessor(load_rgb(*open_image(data, MAX_PIXELS)))
        diff = _in_8bit_units(got, expected, preprocessor)
        assert diff.max().item() <= 1 + 1e-3
        assert diff.mean().item() <= 0.001


def test_uploads_the_device_path_does_not_take_are_left_to_the_cpu() -> None:
    _, decoding = _decoding(PreprocessConfig())
    progressive = _jpeg(_photo(64, 48), progressive=True)
    assert decoding(open_image(progressive, MAX_PIXELS)[0], progressive) is None

    def failing(data: bytes) -> Tensor:
        raise RuntimeError("nvjpegDecode failed: 6")

    _, broken = _decoding(PreprocessConfig(), failing)
    data = _jpeg(_photo(64, 48))
    assert broken(open_image(data, MAX_PIXELS)[0], data) is None


def test_preprocess_device_cuda_needs_a_cuda_model(tmp_path: Path) -> None:
    assert Settings.model_validate({"model_store": tmp_path}).preprocess_device == "cpu"
    assert Settings.model_validate({"model_store": tmp_path, "preprocess_device": "cuda"}).preprocess_device == "cuda"
    with pytest.raises(CheckpointError, match="needs the model on a CUDA device; the device is cpu"):
        device_decoding_for(Preprocessor(PreprocessConfig()), CPU, "demo")


def test_cuda_runs_two_forward_slots_so_copies_overlap_forward_passes() -> None:
    assert default_forward_workers(torch.device("cuda"), 16) == 2
    assert default_forward_workers(CPU, 2) == 2
    assert default_forward_workers(CPU, 16) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_start_asking_for_gpu_decoding_without_a_gpu_fails_naming_the_setting(tmp_path: Path) -> None:
    """The start-up ``deit-serve`` runs, in this process (``failed_start``: one JSON error line, never ready)."""
    store = tmp_path / "store"
    write_tiny_model(store / "tiny")
    settings = Settings.model_validate(
        {"model_store": store, "device": "cpu", "preprocess_device": "cuda", "torch_threads": 1}
    )
    failed = failed_start(settings)
    assert "--preprocess-device cuda needs the model on a CUDA device; the device is cpu" in failed.record["message"]
    assert failed.record["model"] == "tiny"
    assert "exception" not in failed.record  # a refusal that says all, no traceback
