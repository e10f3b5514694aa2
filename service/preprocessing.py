"""DeiT preprocessing, equal to HF's ``DeiTImageProcessor`` (PIL path) for RGB inputs.

Order (decoding in ``service.decoding``): decode → first frame → EXIF orientation → RGB (transparency composited on
white) → bicubic resize → center crop → ×rescale_factor → (x − mean) / std → CHW float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from service.decoding import to_rgb
from service.errors import CheckpointError, ImageTooLarge

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
# What ``DeiTImageProcessor`` falls back to when ``preprocessor_config.json`` omits ``image_mean``/``image_std``.
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
# Resizing by shortest edge keeps the aspect ratio: a 1×N strip would otherwise become an image of N×224 pixels.
MAX_RESIZED_PIXELS = 64 * 2**20
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class PreprocessConfig:
    """What ``preprocessor_config.json`` says, with ``DeiTImageProcessor``'s defaults for missing fields."""

    do_resize: bool = True
    # ("square", h, w) resizes to exactly h×w; ("shortest_edge", n, 0) keeps the aspect ratio.
    resize_height: int = 256
    resize_width: int = 256
    shortest_edge: int | None = None
    resample: int = 3  # PIL bicubic
    do_center_crop: bool = True
    crop_height: int = 224
    crop_width: int = 224
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    image_std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    @property
    def output_size(self) -> tuple[int, int]:
        if self.do_center_crop:
            return self.crop_height, self.crop_width
        if self.shortest_edge is not None:
            raise ValueError("output size depends on the input when resizing by shortest edge without a crop")
        return self.resize_height, self.resize_width

    @property
    def resample_name(self) -> str:
        return _RESAMPLE_NAMES.get(self.resample, str(self.resample))

    @classmethod
    def for_image_size(cls, image_size: int) -> PreprocessConfig:
        """Defaults for a checkpoint with no preprocessor config: resize to 256/224 of the input, crop to it."""
        resize = round(image_size * 256 / 224)
        return cls(resize_height=resize, resize_width=resize, crop_height=image_size, crop_width=image_size)

    @classmethod
    def from_directory(cls, directory: Path, default_size: int) -> PreprocessConfig:
        path = directory / "preprocessor_config.json"
        if not path.is_file():
            return cls.for_image_size(default_size)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_dict(raw)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: invalid preprocessor config ({e})") from e

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PreprocessConfig:
        d = cls()
        size = raw.get("size", {"height": d.resize_height, "width": d.resize_width})
        shortest: int | None = None
        if isinstance(size, int):
            rh = rw = size
        elif "shortest_edge" in size:
            shortest, rh, rw = int(size["shortest_edge"]), 0, 0
        else:
            rh, rw = int(size["height"]), int(size["width"])
        crop = raw.get("crop_size", {"height": d.crop_height, "width": d.crop_width})
        ch, cw = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        mean = raw.get("image_mean", IMAGENET_STANDARD_MEAN)
        std = raw.get("image_std", IMAGENET_STANDARD_STD)
        mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(x) for x in mean]
        std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(x) for x in std]
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("image_mean and image_std need 3 values")
        return cls(
            do_resize=bool(raw.get("do_resize", True)),
            resize_height=rh,
            resize_width=rw,
            shortest_edge=shortest,
            resample=int(raw.get("resample", d.resample)),
            do_center_crop=bool(raw.get("do_center_crop", True)),
            crop_height=ch,
            crop_width=cw,
            do_rescale=bool(raw.get("do_rescale", True)),
            rescale_factor=float(raw.get("rescale_factor", d.rescale_factor)),
            do_normalize=bool(raw.get("do_normalize", True)),
            image_mean=(mean[0], mean[1], mean[2]),
            image_std=(std[0], std[1], std[2]),
        )

    def to_dict(self) -> dict[str, Any]:
        """HF ``preprocessor_config.json`` form, for the checkpoints we write."""
        size: dict[str, int] = (
            {"shortest_edge": self.shortest_edge}
            if self.shortest_edge is not None
            else {"height": self.resize_height, "width": self.resize_width}
        )
        return {
            "image_processor_type": "DeiTImageProcessor",
            "do_resize": self.do_resize,
            "size": size,
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": self.crop_height, "width": self.crop_width},
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }


# --- preprocessing --------------------------------------------------------------------------------------------


def _resize_size(cfg: PreprocessConfig, width: int, height: int) -> tuple[int, int]:
    """Target (width, height) of the resize step."""
    if cfg.shortest_edge is None:
        return cfg.resize_width, cfg.resize_height
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _center_crop(image: Image.Image, crop_h: int, crop_w: int) -> Image.Image:
    width, height = image.size
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return image.crop((left, top, left + crop_w, top + crop_h))
    # Smaller than the crop: pad with zeros around it, as the reference processor does.
    canvas = Image.new(image.mode, (max(width, crop_w), max(height, crop_h)))
    canvas.paste(image, ((canvas.width - width) // 2, (canvas.height - height) // 2))
    return _center_crop(canvas, crop_h, crop_w)


class Preprocessor:
    """Turns an RGB image into the model's input tensor; constants are precomputed once per model."""

    def __init__(self, cfg: PreprocessConfig, jpeg_draft: bool = False) -> None:
        self.cfg = cfg
        mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1)
        std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1)
        scale = cfg.rescale_factor if cfg.do_rescale else 1.0
        if cfg.do_normalize:
            scales, shifts = scale / std, mean / std
        else:
            scales, shifts = torch.full((3, 1), scale), torch.zeros(3, 1)
        # (x × scale − shift) of every 8-bit value, per channel, with the same float32 roundings as computing it
        # per pixel: a lookup gives identical numbers without float passes over the image (nor torch threads).
        self._lut = torch.arange(256, dtype=torch.float32).view(1, 256).mul(scales).sub(shifts).numpy()
        # JPEG draft decoding (opt-in): decode at no less than the size the resize step goes to.
        self.draft_size: tuple[int, int] | None = None
        if jpeg_draft and cfg.do_resize:
            edge = cfg.shortest_edge
            self.draft_size = (edge, edge) if edge is not None else (cfg.resize_width, cfg.resize_height)

    def __call__(self, image: Image.Image) -> Tensor:
        cfg = self.cfg
        if image.mode != "RGB":
            image = to_rgb(image)
        if cfg.do_resize:
            size = _resize_size(cfg, image.width, image.height)
            if size[0] * size[1] > MAX_RESIZED_PIXELS:
                raise ImageTooLarge(
                    f"a {image.width}×{image.height} image would be resized to {size[0]}×{size[1]} pixels, more than "
                    f"{MAX_RESIZED_PIXELS}: its aspect ratio is too extreme"
                )
            if size != image.size:
                image = image.resize(size, resample=Image.Resampling(cfg.resample))
        if cfg.do_center_crop:
            image = _center_crop(image, cfg.crop_height, cfg.crop_width)
        rgb = np.asarray(image)
        pixels = np.empty((3, *rgb.shape[:2]), dtype=np.float32)
        for channel in range(3):
            np.take(self._lut[channel], rgb[:, :, channel], out=pixels[channel])
        return torch.from_numpy(pixels)
