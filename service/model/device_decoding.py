"""JPEG decoding and preprocessing on the GPU (opt-in: ``--preprocess-device cuda``; CPU decoding is the default).

An upload is parsed and checked exactly as on the CPU path first (allowlist, variants, pixel limit: ``open_image``).
A JPEG the device path takes is then decoded by nvJPEG (``torchvision.io.decode_jpeg`` on the device), turned upright
from its EXIF orientation, resized with torch's antialiased filters (PIL's separable kernels), rounded to 8 bits as
PIL's resize is, center-cropped (zero-padded when smaller) and normalized with the CPU path's own constants, all on
the device. What it does not take goes the CPU path, image by image: other formats, CMYK JPEGs, progressive or
arithmetic-coded JPEGs, JPEGs stored as RGB (Adobe transform 0) or without their end-of-image marker (nvJPEG may
decode a truncated file that libjpeg refuses), any image the device decoder fails on; and every image of a model
whose resize filter torch lacks (lanczos, box, hamming). ``jpeg_draft`` applies to the CPU path only.

Everything after the decode is plain torch, so it runs (and is tested) on any device; only nvJPEG needs CUDA. The
paths differ by the JPEG decoders (IDCT, chroma upsampling) and by the resize's rounding between its two passes:
``benchmarks/device_decoding.py`` measures how far.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from service.errors import CheckpointError
from service.model.cuda_streams import on_thread_stream
from service.model.decoding import DATA_ERRORS, jpeg_frame
from service.model.preprocessing import PreprocessConfig, Preprocessor, resize_size

log = logging.getLogger("deit_serve.device_decoding")

# PIL filter number → torch's mode with the same kernel (PIL's nearest samples at pixel centres: nearest-exact).
TORCH_FILTERS = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
# Sequential Huffman-coded frames (baseline, extended): what every nvJPEG backend decodes.
DEVICE_JPEG_FRAMES = frozenset({0xC0, 0xC1})
_ORIENTATION = 0x0112  # EXIF tag


def model_refusal(cfg: PreprocessConfig) -> str | None:
    """Why a model's preprocessing cannot run on the device, or ``None`` when it can."""
    if cfg.do_resize and cfg.resample not in TORCH_FILTERS:
        return f"its resize filter ({cfg.resample_name}) has no equivalent in torch"
    return None


def image_refusal(image: Image.Image, data: bytes) -> str | None:
    """Why an opened upload goes the CPU path, or ``None`` when the device decoder takes it."""
    if image.format != "JPEG":
        return f"a {image.format} image"
    if image.mode not in ("L", "RGB"):
        return f"a {image.mode} JPEG"
    frame = jpeg_frame(data)
    if frame is None or frame[0] not in DEVICE_JPEG_FRAMES:
        return "a progressive or arithmetic-coded JPEG"
    if image.info.get("adobe_transform") == 0 and image.mode == "RGB":
        return "a JPEG stored as RGB, not YCbCr (Adobe transform 0)"
    if data[-1024:].rstrip(b"\0")[-2:] != b"\xff\xd9":
        return "a JPEG without its end-of-image marker (truncated?)"  # nvJPEG may decode what libjpeg refuses
    return None


def upright(pixels: Tensor, orientation: int) -> Tensor:
    """``[C, H, W]`` pixels as ``ImageOps.exif_transpose`` turns an image with this EXIF orientation (1–8)."""
    if orientation == 2:
        return pixels.flip(-1)
    if orientation == 3:
        return pixels.flip(-2, -1)
    if orientation == 4:
        return pixels.flip(-2)
    if orientation in (5, 6, 7, 8):
        transposed = pixels.transpose(-2, -1)
        flips = {5: (), 6: (-1,), 7: (-2, -1), 8: (-2,)}[orientation]
        return transposed.flip(flips) if flips else transposed
    return pixels


def center_crop(pixels: Tensor, height: int, width: int) -> Tensor:
    """The central ``height``×``width`` of ``[C, H, W]`` pixels, zero-padded around them first when smaller, with
    the same offsets as the CPU path's crop."""
    _, h, w = pixels.shape
    padded_h, padded_w = max(h, height), max(w, width)
    if (padded_h, padded_w) != (h, w):
        top, left = (padded_h - h) // 2, (padded_w - w) // 2
        pixels = F.pad(pixels, (left, padded_w - w - left, top, padded_h - h - top))
    top, left = (padded_h - height) // 2, (padded_w - width) // 2
    return pixels[:, top : top + height, left : left + width]


class TensorPreprocessor:
    """The CPU ``Preprocessor``'s steps on an upright ``[3, H, W]`` uint8 tensor, on the tensor's device."""

    def __init__(self, preprocessor: Preprocessor, device: torch.device) -> None:
        refusal = model_refusal(preprocessor.cfg)
        if refusal is not None:
            raise ValueError(f"preprocessing cannot run on the device: {refusal}")
        self.cfg = preprocessor.cfg
        self._mode = TORCH_FILTERS[self.cfg.resample]
        self._scales = preprocessor.scales.to(device).view(3, 1, 1)
        self._shifts = preprocessor.shifts.to(device).view(3, 1, 1)

    def _resize(self, pixels: Tensor, height: int, width: int) -> Tensor:
        """PIL's resize of an 8-bit image: the width first, then the height, each pass rounded to 8 bits."""
        if self._mode == "nearest-exact":
            return F.interpolate(pixels[None], size=(height, width), mode=self._mode)[0]
        for size in ((pixels.shape[1], width), (height, width)):
            if size != tuple(pixels.shape[1:]):
                resized = F.interpolate(pixels[None], size=size, mode=self._mode, antialias=True, align_corners=False)
                pixels = resized[0].round_().clamp_(0, 255)
        return pixels

    def __call__(self, rgb: Tensor) -> Tensor:
        cfg = self.cfg
        pixels = rgb.float()
        if cfg.do_resize:
            width, height = resize_size(cfg, rgb.shape[2], rgb.shape[1])
            if (height, width) != tuple(rgb.shape[1:]):
                pixels = self._resize(pixels, height, width)
        if cfg.do_center_crop:
            pixels = center_crop(pixels, cfg.crop_height, cfg.crop_width)
        # The same float32 operations as the CPU path's lookup table, so equal 8-bit pixels give equal inputs.
        return pixels.mul(self._scales).sub_(self._shifts)


Decode = Callable[[bytes], Tensor]  # JPEG bytes → [3, H, W] uint8 RGB on the device, as stored (not turned)


_NVJPEG_LOCK = threading.Lock()  # torchvision keeps one nvJPEG decoder per process


def nvjpeg_decoder(device: torch.device) -> Decode:
    """nvJPEG through torchvision, one image at a time in the process."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as e:
        raise CheckpointError(
            f"--preprocess-device cuda decodes JPEGs with torchvision's nvJPEG decoder, which cannot be imported "
            f"({e}); install the torchvision build that matches torch {torch.__version__}"
        ) from e

    def decode(data: bytes) -> Tensor:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        with _NVJPEG_LOCK:
            # The decoder allocates its output on this thread's stream and writes it on a stream of its own: nothing
            # queued here may still use the memory it is handed.
            torch.cuda.current_stream(device).synchronize()
            image: Tensor = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        return image

    return decode


class DeviceDecoding:
    """Decode and preprocess the uploads the device path takes; ``None`` for the others (the CPU path's)."""

    def __init__(self, preprocessor: Preprocessor, device: torch.device, decode: Decode) -> None:
        self.device = device
        self._preprocess = TensorPreprocessor(preprocessor, device)
        self._decode = decode

    def __call__(self, image: Image.Image, data: bytes) -> Tensor | None:
        """``[3, h, w]`` float32 model input on the device, complete when returned; ``None`` to use the CPU."""
        if image_refusal(image, data) is not None:
            return None
        try:
            orientation = image.getexif().get(_ORIENTATION, 1)
        except DATA_ERRORS:  # malformed EXIF: the CPU path names the problem
            return None
        with on_thread_stream(self.device) as stream:
            try:
                rgb = self._decode(data)
                if tuple(rgb.shape) != (3, image.height, image.width):
                    return None
                pixels = self._preprocess(upright(rgb, orientation if isinstance(orientation, int) else 1))
                if stream is not None:
                    stream.synchronize()  # ready for the forward thread's stream
            except RuntimeError as e:  # nvJPEG's refusals, device out of memory: the CPU path decides
                log.debug("device decoding failed, decoding on the CPU", extra={"error": str(e)})
                return None
        return pixels


def device_decoding_for(preprocessor: Preprocessor, device: torch.device, model: str) -> DeviceDecoding | None:
    """``--preprocess-device cuda`` for one model on ``device``: the device path, or ``None`` with a log line when
    the model's preprocessing has no device equivalent (its images then decode on the CPU)."""
    if device.type != "cuda":
        raise CheckpointError(f"--preprocess-device cuda needs the model on a CUDA device; the device is {device}")
    refusal = model_refusal(preprocessor.cfg)
    if refusal is not None:
        log.warning("images of this model are decoded on the CPU", extra={"model": model, "reason": refusal})
        return None
    return DeviceDecoding(preprocessor, device, nvjpeg_decoder(device))
