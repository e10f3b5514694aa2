"""Preprocessed pixel tensors from a client, checked before they are queued: a NaN, an infinity, a value no
normalisation gives, a boolean or a string is the client's error (400 naming the input and the element), never a
forward pass that fails or answers NaN."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.errors import BadRequest

# Normalised pixels lie within a few units of zero (ImageNet's mean/std give -2.2..2.7); this bound leaves room for
# any normalisation while keeping every activation finite in float16 and bfloat16.
MAX_PIXEL_MAGNITUDE = 1e4
_NUMBERS = frozenset((int, float))


def pixels_from_json(values: list[Any], name: str) -> np.ndarray[Any, np.dtype[np.float32]]:
    """JSON ``data`` (already flattened) as float32; only numbers (not booleans, strings or null) are pixels."""
    if not set(map(type, values)) <= _NUMBERS:
        index, bad = next((i, v) for i, v in enumerate(values) if type(v) not in _NUMBERS)
        raise BadRequest(f"input {name!r} element {index} is {_shown(bad)}: 'data' must hold numbers")
    try:
        array = np.asarray(values, dtype=np.float64)
    except OverflowError as e:  # an integer literal past float64 (10**400)
        index = next(i for i, v in enumerate(values) if type(v) is int and abs(v) > MAX_PIXEL_MAGNITUDE)
        raise BadRequest(
            f"input {name!r} element {index} is out of range: pixel values must lie within ±{MAX_PIXEL_MAGNITUDE:g}"
        ) from e
    return check_pixels(array, name).astype(np.float32)


def check_pixels(array: np.ndarray[Any, Any], name: str) -> np.ndarray[Any, Any]:
    """``array`` itself when every value is finite and within ``MAX_PIXEL_MAGNITUDE``; else 400 naming the first
    element that is not."""
    # In the array's own dtype (float16's largest, 65504, is past the bound): no widened copy of a large tensor.
    with np.errstate(invalid="ignore", over="ignore"):
        good = np.isfinite(array) & (np.abs(array) <= MAX_PIXEL_MAGNITUDE)
    if not bool(good.all()):
        index = int(np.argmin(good))
        value = float(array.flat[index])
        problem = "not a finite number" if not np.isfinite(value) else f"out of range (±{MAX_PIXEL_MAGNITUDE:g})"
        raise BadRequest(f"input {name!r} element {index} is {value!r}: {problem}")
    return array


def _shown(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
