"""DeiT preprocessing, equal to HF's ``DeiTImageProcessor`` (PIL path) for RGB inputs.

Order (decoding in ``service.model.decoding``): decode → first frame → EXIF orientation → RGB (transparency
composited on white) → bicubic resize → center crop → ×rescale_factor → (x − mean) / std → CHW float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from service.errors import CheckpointError, ImageTooLarge
from service.model.decoding import to_rgb
from service.model.json_files import naming, read_json_object

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
# What ``DeiTImageProcessor`` falls back to when ``preprocessor_config.json`` omits ``image_mean``/``image_std``.
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
# Resizing by shortest edge keeps the aspect ratio: a 1×N strip would otherwise become an image of N×224 pixels.
MAX_RESIZED_PIXELS = 64 * 2**20
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_FILTERS = ", ".join(f"{number} {name}" for number, name in _RESAMPLE_NAMES.items())
# Largest side a preprocessor config may resize or crop to: the resize bound above, as a square.
MAX_CONFIG_SIDE = 8192
_FLOAT32_MAX = 3.4e38


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

    def __post_init__(self) -> None:
        """Refuse what would fail or mislead on every request: the config is read once, requests are many."""
        if self.resample not in _RESAMPLE_NAMES:
            raise CheckpointError(f"resample must be a PIL filter number ({_FILTERS}), got {self.resample!r}")
        sides = {"crop_size.height": self.crop_height, "crop_size.width": self.crop_width}
        if self.do_resize:
            if self.shortest_edge is None:
                sides |= {"size.height": self.resize_height, "size.width": self.resize_width}
            else:
                sides["size.shortest_edge"] = self.shortest_edge
        for where, side in sides.items():
            if not 1 <= side <= MAX_CONFIG_SIDE:
                raise CheckpointError(f"{where} must be from 1 to {MAX_CONFIG_SIDE} pixels, got {side}")
        if not self.do_center_crop and (not self.do_resize or self.shortest_edge is not None):
            raise CheckpointError(
                "without do_center_crop, only a resize to a fixed size {height, width} gives every image the same "
                "input size; otherwise each upload would keep its own size and images could not be batched"
            )
        if not (math.isfinite(self.rescale_factor) and self.rescale_factor > 0):
            raise CheckpointError(f"rescale_factor must be a finite number above 0, got {self.rescale_factor}")
        if not all(math.isfinite(m) for m in self.image_mean):
            raise CheckpointError(f"image_mean must be finite numbers, got {list(self.image_mean)}")
        if not all(math.isfinite(x) and x > 0 for x in self.image_std):
            raise CheckpointError(f"image_std must be finite numbers above 0, got {list(self.image_std)}")
        scale = self.rescale_factor if self.do_rescale else 1.0
        extremes = [(v * scale - m) / d for m, d in zip(self.image_mean, self.image_std, strict=True) for v in (0, 255)]
        if self.do_normalize and not all(abs(x) < _FLOAT32_MAX for x in extremes):
            raise CheckpointError("image_std is so small that normalised pixels overflow float32")

    @property
    def output_size(self) -> tuple[int, int]:
        if self.do_center_crop:
            return self.crop_height, self.crop_width
        return self.resize_height, self.resize_width

    @property
    def resample_name(self) -> str:
        return _RESAMPLE_NAMES[self.resample]

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
        return cls.from_dict(read_json_object(path), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "preprocessor_config.json") -> PreprocessConfig:
        """Read the fields ``DeiTImageProcessor`` uses; others (processor type, …) are ignored. A field of the
        wrong type or out of range is a ``CheckpointError`` naming ``source`` and the field."""
        with naming(source):
            return cls._from_dict(raw)

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> PreprocessConfig:
        d = cls()
        shortest: int | None = None
        size = _given(raw, "size", {"height": d.resize_height, "width": d.resize_width})
        if isinstance(size, dict) and set(size) == {"shortest_edge"}:
            shortest, rh, rw = _side(size["shortest_edge"], "size.shortest_edge"), 0, 0
        else:
            rh, rw = _height_width(size, "size")
        ch, cw = _height_width(_given(raw, "crop_size", {"height": d.crop_height, "width": d.crop_width}), "crop_size")
        resample = _given(raw, "resample", d.resample)
        if not _is_int(resample):
            raise CheckpointError(f"resample must be a PIL filter number ({_FILTERS}), got {resample!r}")
        return cls(
            do_resize=_flag(raw, "do_resize", d.do_resize),
            resize_height=rh,
            resize_width=rw,
            shortest_edge=shortest,
            resample=resample,
            do_center_crop=_flag(raw, "do_center_crop", d.do_center_crop),
            crop_height=ch,
            crop_width=cw,
            do_rescale=_flag(raw, "do_rescale", d.do_rescale),
            rescale_factor=_real(_given(raw, "rescale_factor", d.rescale_factor), "rescale_factor"),
            do_normalize=_flag(raw, "do_normalize", d.do_normalize),
            image_mean=_per_channel(_given(raw, "image_mean", IMAGENET_STANDARD_MEAN), "image_mean"),
            image_std=_per_channel(_given(raw, "image_std", IMAGENET_STANDARD_STD), "image_std"),
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


def _given(raw: dict[str, Any], name: str, default: Any) -> Any:
    """The field's value; absent or ``null`` takes the processor's default, as ``DeiTImageProcessor`` does."""
    value = raw.get(name)
    return default if value is None else value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(raw: dict[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"{name} must be true or false, got {value!r}")
    return value


def _side(value: object, where: str) -> int:
    if not _is_int(value):
        raise CheckpointError(f"{where} must be an integer number of pixels, got {value!r}")
    assert isinstance(value, int)
    return value


def _height_width(value: object, where: str) -> tuple[int, int]:
    """A size written as one number (square) or as ``{"height": h, "width": w}``."""
    if isinstance(value, dict):
        if set(value) != {"height", "width"}:
            raise CheckpointError(
                f"{where} must be a number or {{height, width}}"
                + (" (or {shortest_edge})" if where == "size" else "")
                + f", got keys {sorted(value)}"
            )
        return _side(value["height"], f"{where}.height"), _side(value["width"], f"{where}.width")
    side = _side(value, where)
    return side, side


def _real(value: object, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise CheckpointError(f"{where} must be a number, got {value!r}")
    return float(value)


def _per_channel(value: object, where: str) -> tuple[float, float, float]:
    """One number for all three channels, or a list of three."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise CheckpointError(f"{where} must be a number or a list of 3 numbers (R, G, B), got {value!r}")
    r, g, b = (_real(x, where) for x in value)
    return r, g, b


# --- preprocessing --------------------------------------------------------------------------------------------


def resize_size(cfg: PreprocessConfig, width: int, height: int) -> tuple[int, int]:
    """Target (width, height) of the resize step for a ``width``×``height`` image; ``ImageTooLarge`` when keeping
    the aspect ratio would make it huge."""
    if cfg.shortest_edge is None:
        return cfg.resize_width, cfg.resize_height
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    if size[0] * size[1] > MAX_RESIZED_PIXELS:
        raise ImageTooLarge(
            f"a {width}×{height} image would be resized to {size[0]}×{size[1]} pixels, more than "
            f"{MAX_RESIZED_PIXELS}: its aspect ratio is too extreme"
        )
    return size


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
        self.scales, self.shifts = scales.view(3), shifts.view(3)  # x × scale − shift, per channel
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
            size = resize_size(cfg, image.width, image.height)
            if size != image.size:
                image = image.resize(size, resample=Image.Resampling(cfg.resample))
        if cfg.do_center_crop:
            image = _center_crop(image, cfg.crop_height, cfg.crop_width)
        rgb = np.asarray(image)
        pixels = np.empty((3, *rgb.shape[:2]), dtype=np.float32)
        for channel in range(3):
            np.take(self._lut[channel], rgb[:, :, channel], out=pixels[channel])
        return torch.from_numpy(pixels)
