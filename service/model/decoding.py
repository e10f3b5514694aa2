"""Uploads to RGB images: only an allowlist of raster formats is decoded, and its pixel limit is checked on what
will be decoded, before any pixel is.

Why not ``Image.open``: it tries every plugin Pillow has (EPS hands the upload to Ghostscript when pixels are
loaded), and its own decompression-bomb check warns through the process-wide ``warnings`` machinery, which cannot be
silenced per call while decodes run in a pool of threads. Here each allowed plugin's registered signature test
(``accept``) and reader (``factory``) are called directly, exactly as ``Image.open`` calls them, and sizes are compared
against the limit by this module. The limit never exceeds Pillow's ``MAX_IMAGE_PIXELS``, so the checks Pillow's readers
make on their own (GIF frames, ICO entries) stay silent.

What frame 0 of an animation decodes (Pillow 13): a WebP, animated or not, goes through libwebp's animation decoder,
which allocates and fills canvas-sized buffers when it is created and when frame 0 is rendered; a GIF's frame 0 is
pasted on the logical screen, grown to the frame's box; an APNG's frame 0 is its IHDR image. Later frames are never
decoded. So the budget is the canvas (once), read from the header before the plugin is asked to open anything.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Callable

import numpy as np
from PIL import (  # noqa: F401  (importing a plugin registers it; each accepted format's plugin is imported here)
    BmpImagePlugin,
    GifImagePlugin,
    IcoImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    PpmImagePlugin,
    PsdImagePlugin,
    SpiderImagePlugin,
    TgaImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from service.errors import EmptyUpload, ImageTooLarge, InvalidImage, UnsupportedMediaType

# Pillow's format id → the name users know, in the order they are tried. TGA and SPIDER have no signature: their
# readers check a header's consistency, so they come last, on what nothing else claimed.
ACCEPTED_FORMATS = {
    "JPEG": "JPEG",
    "PNG": "PNG",
    "WEBP": "WebP",
    "GIF": "GIF",
    "BMP": "BMP",
    "TIFF": "TIFF",
    "ICO": "ICO",
    "PPM": "PBM/PGM/PPM",
    "PSD": "PSD",
    "TGA": "TGA",
    "SPIDER": "SPIDER",
}
ACCEPTED_NAMES = ", ".join(ACCEPTED_FORMATS.values())
# Signatures specific enough that a file carrying one and failing to parse is a broken image of that format, not
# something else (PPM's "P" + one character also starts plain text).
_DISTINCTIVE = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PSD"})
# What Pillow's readers raise on malformed headers and data (struct.error: short reads they unpack).
DATA_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    EOFError,
    IndexError,
    KeyError,
    ArithmeticError,
    struct.error,
)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def decode_image(data: bytes, max_pixels: int, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode an upload into an RGB image, refusing bombs before their pixels are decoded.

    ``draft``: let the JPEG decoder scale down by 1/2, 1/4 or 1/8 while decoding, keeping at least this
    (width, height). Much faster for large photos, but not the pixels of a full decode (opt-in, ``jpeg_draft``).
    """
    return load_rgb(*open_image(data, max_pixels), draft)


def open_image(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """The upload's header, parsed by the first accepted format that claims it, its pixel limit checked; nothing
    is decoded yet. Returns the opened image and the format's name for messages."""
    if not data:
        raise EmptyUpload("the uploaded file is empty")
    ceiling = Image.MAX_IMAGE_PIXELS
    limit = max_pixels if ceiling is None else min(max_pixels, ceiling)
    return _open(data, limit)


def load_rgb(image: Image.Image, name: str, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image ``open_image`` returned: frame 0, upright (EXIF orientation), RGB."""
    try:
        # A freshly opened image is at its first frame (PSD: the composite; its layers are frames 1…n): no seek.
        if draft is not None and image.format == "JPEG":
            image.draft(None, draft)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # not a copy of the whole image when upright already
        return to_rgb(image)
    except NotImplementedError as e:
        raise UnsupportedMediaType(f"a {name} variant this service cannot read: {e}") from e
    except DATA_ERRORS as e:
        raise InvalidImage(f"{name} image data is truncated or corrupt: {e}") from e


def _open(data: bytes, limit: int) -> tuple[Image.Image, str]:
    """The first accepted format whose reader parses the header; nothing is decoded yet (ICO: see ``_open_ico``)."""
    prefix = data[:16]
    for fmt, name in ACCEPTED_FORMATS.items():
        factory, accept = Image.OPEN[fmt]
        verdict = True if accept is None else accept(prefix)
        if isinstance(verdict, str):  # the signature matches but this build of Pillow lacks the codec
            raise UnsupportedMediaType(f"{name} images cannot be read by this server: {verdict}")
        if not verdict:
            continue
        try:
            if fmt == "JPEG":
                _refuse_jpeg_variants(data)
            if fmt == "ICO":
                return _open_ico(data, limit), name
            declared = _DECLARED_SIZE.get(fmt)
            if declared is not None:
                _check_pixels(name, declared(data), limit)
            image: Image.Image = factory(io.BytesIO(data), "")
        except NotImplementedError as e:
            raise UnsupportedMediaType(f"a {name} variant this service cannot read: {e}") from e
        except DATA_ERRORS as e:
            if fmt in _DISTINCTIVE:
                raise InvalidImage(f"{name} image is truncated or corrupt: its header could not be read ({e})") from e
            continue
        _check_pixels(name, image.size, limit)
        return image, name
    other = _identify_other_format(data)
    if other is not None:
        raise UnsupportedMediaType(f"this looks like {other}, which is not an accepted format ({ACCEPTED_NAMES})")
    raise UnsupportedMediaType(f"not an image in a format this service can read ({ACCEPTED_NAMES})")


def _check_pixels(name: str, size: tuple[int, int], limit: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"{name} image has no pixels ({width}×{height})")
    if width * height > limit:
        raise ImageTooLarge(f"{name} image has {width}×{height} pixels, more than the limit of {limit}")


# --- sizes read from headers, for readers that allocate or decode while opening -------------------------------------


def _webp_canvas(data: bytes) -> tuple[int, int]:
    """The canvas libwebp's decoder allocates when Pillow opens the file (VP8X: the animation's canvas)."""
    kind = data[12:16]
    if kind == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if kind == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":  # a key frame's start code
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if kind == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    raise SyntaxError("WebP header is truncated: no canvas size")


_GIF_BLOCK = re.compile(rb"[\x21\x2c\x3b]")  # extension, image descriptor, trailer


def _gif_canvas(data: bytes) -> tuple[int, int]:
    """The logical screen grown to frame 0's box: what Pillow allocates for frame 0, while opening the file."""
    if len(data) < 13:
        raise SyntaxError("GIF header is truncated")
    width, height = struct.unpack_from("<HH", data, 6)
    position = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while (found := _GIF_BLOCK.search(data, position)) is not None:  # Pillow skips other bytes too
        position = found.start()
        if data[position] == 0x3B:
            break
        if data[position] == 0x2C:
            if position + 9 > len(data):
                break
            left, top, frame_width, frame_height = struct.unpack_from("<HHHH", data, position + 1)
            return max(width, left + frame_width), max(height, top + frame_height)
        position += 2  # extension introducer and label, then sub-blocks up to an empty one
        while position < len(data) and data[position]:
            position += 1 + data[position]
        position += 1
    return width, height


def _psd_size(data: bytes) -> tuple[int, int]:
    """Header size; the reader builds per-row tables before pixels, so the format's own bound (30 000) holds too."""
    if len(data) < 26:
        raise SyntaxError("PSD header is truncated")
    height, width = struct.unpack_from(">II", data, 14)
    if width > 30_000 or height > 30_000:
        raise SyntaxError(f"{width}×{height} is beyond the PSD format's 30000 pixels per side")
    return width, height


_DECLARED_SIZE: dict[str, Callable[[bytes], tuple[int, int]]] = {
    "WEBP": _webp_canvas,
    "GIF": _gif_canvas,
    "PSD": _psd_size,
}


def _open_ico(data: bytes, limit: int) -> Image.Image:
    """The icon ``IcoImageFile`` would show (its largest entry), checked by the size its embedded image declares.

    ``IcoImageFile`` decodes that entry while opening the file, trusting the directory's size (one byte per side)
    until after decoding; a 16×16 entry can hold a 9000×9000 PNG.
    """
    fp = io.BytesIO(data)
    icon = IcoImagePlugin.IcoFile(fp)  # the directory only
    if not icon.entry:
        raise SyntaxError("ICO directory lists no images")
    entry = icon.entry[0]
    fp.seek(entry.offset)
    embedded: Image.Image
    if fp.read(8) == _PNG_MAGIC:
        fp.seek(entry.offset)
        embedded = PngImagePlugin.PngImageFile(fp)  # header chunks only
    else:
        fp.seek(entry.offset)
        embedded = BmpImagePlugin.DibImageFile(fp)  # the header counts the colour and mask rows: both are read
    _check_pixels("ICO", embedded.size, limit)
    return icon.frame(0)  # PNG: opened, not loaded yet; DIB: combined with its mask here


# --- what an upload is, when it is not an accepted format --------------------------------------------------------

_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


def _identify_other_format(data: bytes) -> str | None:
    """Name the format of an upload no accepted reader claimed, from signatures only: no reader is run.

    Pillow's registered ``accept`` functions are pure tests on the first 16 bytes; readers of formats outside the
    allowlist (EPS calls Ghostscript) are never called.
    """
    head = data[:16]
    if head.startswith(b"%PDF-"):
        return "PDF"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "HEIF/HEIC"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JPEG XL"
    if b"<svg" in data[:1024].lower():
        return "SVG"
    Image.init()  # registers every plugin: importing one runs nothing external
    for fmt, (factory, accept) in list(Image.OPEN.items()):
        if fmt in ACCEPTED_FORMATS or accept is None:
            continue
        try:
            verdict = accept(head)
        except (IndexError, struct.error, TypeError, ValueError):  # a test written for longer prefixes
            continue
        if verdict:
            description = getattr(factory, "format_description", None)
            return f"{fmt} ({description})" if description else fmt
    return None


def jpeg_frame(data: bytes) -> tuple[int, int | None, int | None] | None:
    """The frame header of a JPEG: its SOF marker (0xC0 baseline, 0xC1 extended, 0xC2 progressive, …), sample
    precision in bits and number of colour components (``None`` when the header is cut short); ``None`` when no
    frame header precedes the first scan."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header: for the reader
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            frame = data[position + 4 : position + 10]
            if len(frame) < 6:
                return marker, None, None
            return marker, frame[0], frame[5]
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None


def _refuse_jpeg_variants(data: bytes) -> None:
    """Name the JPEG variants Pillow's reader refuses or libjpeg cannot decode, from the frame header.

    Pillow reads 8-bit JPEG with 1, 3 or 4 components; hierarchical JPEG (SOF5–7, 13–15) has no libjpeg decoder.
    """
    frame = jpeg_frame(data)
    if frame is None:
        return
    marker, precision, components = frame
    if marker in (0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF):
        raise UnsupportedMediaType(f"hierarchical JPEG (SOF{marker - 0xC0}) is not supported")
    if precision is not None and precision != 8:
        raise UnsupportedMediaType(f"{precision}-bit JPEG is not supported: only 8-bit JPEG can be decoded")
    if components is not None and components not in (1, 3, 4):
        raise UnsupportedMediaType(f"JPEG with {components} colour components is not supported")


# --- colour -------------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white, high bit depths scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _to_8bit(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")  # no copy: this can be 4 bytes a pixel
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    arr = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
    else:
        scale = 1 / 257 if float(arr.max(initial=0)) > 255 else 1.0
    arr = np.nan_to_num(arr * scale, nan=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
