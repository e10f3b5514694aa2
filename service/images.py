"""An image file as a client sent it: what the HTTP edge reads and the engine decodes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncodedImage:
    """An uploaded image file as received; ``name`` labels it in results and error messages."""

    name: str
    data: bytes
