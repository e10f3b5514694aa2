"""Decoding untrusted uploads: only accepted raster formats are read (nothing reaches Ghostscript), pixel limits hold
for what is actually decoded (ICO entries, animation canvases) before any pixel is, valid PSD/SPIDER files decode,
unsupported variants are named, and no warning escapes the JSON log."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from service.errors import ImageTooLarge, InvalidImage, ServiceError, UnsupportedMediaType
from service.model.decoding import ACCEPTED_FORMATS, decode_image
from tests.profiles import KEYED, KEYED_AUTH, ghostscript_trap, keyed_server
from tests.serving import ServerProcess, SharedServers, rss_bytes

MAX_PIXELS = 1_000_000  # the server's limit: far below every bomb here, far above every valid image
RED = (200, 30, 30)


# --- files, written by Pillow where it can, crafted byte by byte where it cannot --------------------------------


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_rgba_png(width: int, height: int) -> bytes:
    """A real, complete RGBA PNG of zeros, compressed row by row (no width×height buffer in the test)."""
    row = bytes(1 + 4 * width)
    compressor = zlib.compressobj(6)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def ico_holding(embedded: bytes, listed: tuple[int, int] = (16, 16)) -> bytes:
    """An icon whose one directory entry says ``listed`` but holds ``embedded`` (a PNG or a DIB)."""
    entry = struct.pack("<BBBBHHII", listed[0] % 256, listed[1] % 256, 0, 0, 1, 32, len(embedded), 22)
    return struct.pack("<HHH", 0, 1, 1) + entry + embedded


def dib_header(width: int, height: int) -> bytes:
    """A BITMAPINFOHEADER for 32-bit pixels, with no pixels after it."""
    return struct.pack("<IiiHHIIiiII", 40, width, height, 1, 32, 0, 0, 0, 0, 0, 0)


def psd(width: int, height: int, color: tuple[int, int, int] = RED) -> bytes:
    """A flat 8-bit RGB Photoshop file (no layers, raw channels): Pillow reads PSD but cannot write it."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    planes = b"".join(bytes([value]) * (width * height) for value in color)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + planes


def jpeg_with_frame(marker: int = 0xC0, precision: int = 8, components: int | None = None) -> bytes:
    """A real baseline JPEG with its frame header's marker, sample precision or component count rewritten.

    Pillow cannot write 12-bit JPEG; the frame header is where every decoder learns the precision.
    """
    data = bytearray(encode(Image.new("RGB", (32, 24), (10, 200, 30)), "JPEG"))
    at = data.index(b"\xff\xc0")
    data[at + 1], data[at + 4] = marker, precision
    if components is not None:
        data[at + 9] = components
    return bytes(data)


def riff_chunk(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) % 2)


def u24(value: int) -> bytes:
    return struct.pack("<I", value)[:3]


def animated_webp(canvas: tuple[int, int], frames: int, frame: tuple[int, int] = (16, 16)) -> bytes:
    """An animation of ``frames`` tiny lossless frames on a ``canvas``, assembled from a frame Pillow encoded."""
    still = encode(Image.new("RGB", frame, (20, 120, 220)), "WEBP", lossless=True)
    assert still[12:16] == b"VP8L"
    bitstream = riff_chunk(b"VP8L", still[20 : 20 + struct.unpack_from("<I", still, 16)[0]])
    vp8x = riff_chunk(b"VP8X", b"\x02\0\0\0" + u24(canvas[0] - 1) + u24(canvas[1] - 1))  # flag: animation
    anim = riff_chunk(b"ANIM", struct.pack("<IH", 0xFFFFFFFF, 0))
    anmf = riff_chunk(b"ANMF", u24(0) + u24(0) + u24(frame[0] - 1) + u24(frame[1] - 1) + u24(100) + b"\0" + bitstream)
    body = b"WEBP" + vp8x + anim + anmf * frames
    return b"RIFF" + struct.pack("<I", len(body)) + body


def gif_descriptor(data: bytes) -> int:
    """Offset of the first image descriptor: after the screen, its palette and any extension blocks."""
    at = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while data[at] == 0x21:
        at += 2
        while data[at]:
            at += 1 + data[at]
        at += 1
    assert data[at] == 0x2C
    return at


def gif_with_first_frame(box: tuple[int, int], screen: tuple[int, int] = (8, 8)) -> bytes:
    """A GIF whose first frame is ``box`` on a smaller logical ``screen``: a real frame when small, else claimed."""
    real = box[0] * box[1] <= 64 * 64
    data = bytearray(encode(Image.new("P", box if real else screen, 3), "GIF"))
    data[6:10] = struct.pack("<HH", *screen)
    if not real:
        at = gif_descriptor(bytes(data))
        data[at + 5 : at + 9] = struct.pack("<HH", *box)
    return bytes(data)


def png_with_invalid_animation(image: Image.Image) -> bytes:
    """A valid PNG with an acTL chunk claiming zero frames: Pillow warns and shows the still image."""
    png = encode(image, "PNG")
    idat = png.index(b"IDAT") - 4
    return png[:idat] + png_chunk(b"acTL", struct.pack(">II", 0, 0)) + png[idat:]


PHOTO = Image.radial_gradient("L").convert("RGB").resize((64, 48))
EPS = encode(PHOTO, "EPS")  # what Pillow writes is PostScript; reading it back would run Ghostscript
PDF = encode(PHOTO, "PDF")
ICO_BOMB = ico_holding(blank_rgba_png(9000, 9000))  # 16×16 in the directory; 324 MB of RGBA when decoded
WEBP_BOMB = animated_webp((6000, 6000), 280)  # 256-pixel frames on a 36-megapixel canvas
JPEG_12_BIT = jpeg_with_frame(marker=0xC1, precision=12)  # extended sequential, 12-bit samples
SPIDER = encode(Image.linear_gradient("L").resize((64, 48)).convert("F"), "SPIDER")


# --- unit: what is accepted, and only that ------------------------------------------------------------------------

ACCEPTED = {
    "JPEG": encode(PHOTO, "JPEG"),
    "PNG": encode(PHOTO, "PNG"),
    "WEBP": encode(PHOTO, "WEBP", lossless=True),
    "GIF": encode(PHOTO, "GIF"),
    "BMP": encode(PHOTO, "BMP"),
    "TIFF": encode(PHOTO, "TIFF", compression="tiff_lzw"),
    "ICO": encode(PHOTO, "ICO", sizes=[(64, 48)]),
    "ICO-bmp": encode(PHOTO, "ICO", sizes=[(64, 48)], bitmap_format="bmp"),
    "PPM": encode(PHOTO, "PPM"),
    "PGM": encode(PHOTO.convert("L"), "PPM"),
    "PBM": encode(PHOTO.convert("1"), "PPM"),
    "PSD": psd(64, 48),
    "TGA": encode(PHOTO, "TGA"),
    "SPIDER": SPIDER,
}


def test_every_accepted_format_has_a_decoded_sample() -> None:
    assert {name.split("-")[0] for name in ACCEPTED} - {"PGM", "PBM"} == set(ACCEPTED_FORMATS)


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_formats_decode_without_warnings(name: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoded = decode_image(ACCEPTED[name], MAX_PIXELS)
    assert (decoded.mode, decoded.size) == ("RGB", (64, 48))
    assert [str(w.message) for w in caught] == []


def test_psd_and_spider_give_their_pixels() -> None:
    flat = np.asarray(decode_image(psd(30, 20), MAX_PIXELS))
    assert flat.shape == (20, 30, 3)
    assert (flat == RED).all()
    spider = np.asarray(decode_image(SPIDER, MAX_PIXELS))[..., 0]
    expected = np.asarray(Image.linear_gradient("L").resize((64, 48)))
    np.testing.assert_array_equal(spider, expected)


OTHER_FORMATS = {
    "EPS": EPS,
    "PDF": PDF,
    "PCX": encode(PHOTO, "PCX"),
    "SGI": encode(PHOTO, "SGI"),
    "DDS": encode(PHOTO.convert("RGBA"), "DDS"),
    "QOI": encode(PHOTO, "QOI"),
    "ICNS": encode(PHOTO.convert("RGBA"), "ICNS"),
    "HEIF": b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64),
}


@pytest.mark.parametrize("name", OTHER_FORMATS)
def test_intact_files_of_other_formats_are_refused_by_name(name: str) -> None:
    with pytest.raises(UnsupportedMediaType, match=name):
        decode_image(OTHER_FORMATS[name], MAX_PIXELS)


def test_an_eps_upload_never_reaches_ghostscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = ghostscript_trap(tmp_path)  # a ``gs`` first on PATH that only records that it ran
    monkeypatch.setenv("PATH", f"{marker.parent / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # forget any earlier lookup
    with pytest.raises(UnsupportedMediaType, match="EPS"):
        decode_image(EPS, MAX_PIXELS)
    assert EpsImagePlugin.gs_binary is None, "Ghostscript was looked for"
    assert not marker.exists()
    # The same bytes through Pillow's generic opener do run it: the fake is real.
    with pytest.raises((subprocess.CalledProcessError, OSError)):
        Image.open(io.BytesIO(EPS)).load()
    assert marker.exists()


CORRUPT = {
    "png-signature-only": encode(PHOTO, "PNG")[:8],
    "webp-header-only": encode(PHOTO, "WEBP")[:20],
    "gif-header-only": encode(PHOTO, "GIF")[:10],
    "ico-directory-cut": ACCEPTED["ICO"][:14],
    "psd-header-cut": psd(64, 48)[:20],
    "psd-data-cut": psd(64, 48)[:200],
    "jpeg-data-cut": ACCEPTED["JPEG"][:300],
    "tiff-data-cut": ACCEPTED["TIFF"][: len(ACCEPTED["TIFF"]) // 3],
}


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_files_of_accepted_formats_are_invalid(name: str) -> None:
    named = ACCEPTED_FORMATS[name.split("-")[0].upper()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow may note cut metadata (TIFF): the server logs that as JSON
        with pytest.raises(InvalidImage, match=named):
            decode_image(CORRUPT[name], MAX_PIXELS)


JPEG_VARIANTS = {
    "12-bit": (JPEG_12_BIT, "12-bit JPEG"),
    "12-bit-baseline-marker": (jpeg_with_frame(precision=12), "12-bit JPEG"),
    "16-bit-lossless": (jpeg_with_frame(marker=0xC3, precision=16), "16-bit JPEG"),
    "hierarchical": (jpeg_with_frame(marker=0xC5), "hierarchical JPEG"),
    # Cut inside its frame header: the marker alone names the variant.
    "hierarchical-cut-short": (
        jpeg_with_frame(marker=0xC5)[: jpeg_with_frame().index(b"\xff\xc0") + 7],
        "hierarchical JPEG",
    ),
    "two-components": (jpeg_with_frame(components=2), "2 colour components"),
}


@pytest.mark.parametrize("name", JPEG_VARIANTS)
def test_unsupported_jpeg_variants_are_named_not_called_corrupt(name: str) -> None:
    data, variant = JPEG_VARIANTS[name]
    with pytest.raises(UnsupportedMediaType, match=variant):
        decode_image(data, MAX_PIXELS)


# --- unit: pixel limits on what is decoded, before it is ----------------------------------------------------------


def refused_quickly(data: bytes, limit: int, size: str) -> float:
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageTooLarge, match=size):
            decode_image(data, limit)
    assert [str(w.message) for w in caught] == []
    return time.perf_counter() - started


def test_an_icon_is_limited_by_the_size_of_the_image_it_embeds() -> None:
    # Fully decoding the PNG took 0.7 s on an idle machine (and 324 MB) before the limit was checked.
    assert refused_quickly(ICO_BOMB, MAX_PIXELS, "9000×9000") < 0.25
    assert refused_quickly(ico_holding(dib_header(9000, 18000)), MAX_PIXELS, "9000×18000") < 0.25
    # A lower limit holds too, not only Pillow's own (the directory says 16×16).
    refused_quickly(ico_holding(encode(PHOTO, "PNG")), 64 * 48 - 1, "64×48")


def test_an_icon_whose_directory_is_wrong_decodes_its_real_image_without_a_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoded = decode_image(ico_holding(encode(PHOTO, "PNG"), listed=(16, 16)), MAX_PIXELS)
    assert decoded.size == (64, 48)
    assert [str(w.message) for w in caught] == []


def test_an_animation_is_limited_by_its_canvas_not_its_frames() -> None:
    assert len(WEBP_BOMB) < 16_000
    assert refused_quickly(WEBP_BOMB, MAX_PIXELS, "6000×6000") < 0.25
    assert refused_quickly(gif_with_first_frame((3000, 3000)), MAX_PIXELS, "3000×3000") < 0.25
    # Frame 0 is rendered on the whole canvas: that is the image that comes out.
    assert decode_image(animated_webp((600, 400), 5), MAX_PIXELS).size == (600, 400)
    assert decode_image(gif_with_first_frame((40, 30)), MAX_PIXELS).size == (40, 30)


def test_sizes_in_pillows_warning_range_are_refused_silently_whatever_the_limit() -> None:
    assert Image.MAX_IMAGE_PIXELS is not None
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 10_000 < 2 * Image.MAX_IMAGE_PIXELS
    for bomb in (gif_with_first_frame((10_000, 10_000)), ico_holding(dib_header(10_000, 10_000))):
        refused_quickly(bomb, 10**12, "10000×10000")


def test_concurrent_decodes_neither_warn_nor_mix_up_results() -> None:
    """Limits are plain comparisons: no process-wide warning filter is changed while other threads decode."""
    bombs = [gif_with_first_frame((10_000, 10_000)), ICO_BOMB, WEBP_BOMB]
    jobs = [(ACCEPTED[name], None) for name in ("PNG", "JPEG", "GIF", "PSD")] + [
        (bomb, ImageTooLarge) for bomb in bombs
    ]

    def run(job: tuple[bytes, type[ServiceError] | None]) -> bool:
        data, error = job
        if error is None:
            return decode_image(data, MAX_PIXELS).size == (64, 48)
        with pytest.raises(error):
            decode_image(data, 10**12 if data is bombs[0] else MAX_PIXELS)
        return True

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(run, jobs * 6))
    assert [str(w.message) for w in caught] == []


# --- on a real server -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_store: Path, servers: SharedServers) -> ServerProcess:
    """The pixel limit ``MAX_PIXELS`` and a ``gs`` first on PATH that only records that it ran (``KEYED``)."""
    assert int(KEYED["DEIT_MAX_IMAGE_PIXELS"]) == MAX_PIXELS
    return keyed_server(servers, tiny_store)


def classify(server: ServerProcess, name: str, data: bytes) -> httpx.Response:
    files = [("file", (name, data, "application/octet-stream"))]
    return httpx.post(f"{server.url}/classify", files=files, headers=KEYED_AUTH, timeout=60)


def classify_measured(server: ServerProcess, name: str, data: bytes) -> tuple[httpx.Response, float, int]:
    """The answer, its seconds, and the server's largest RSS growth while it was computed (sampled every 2 ms)."""
    pid = server.process.pid
    before = rss_bytes(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        response = classify(server, name, data)
    finally:
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
    return response, elapsed, peak[0] - before


def expect_error(response: httpx.Response, status: int, code: str, *named: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, response.text
    for text in named:
        assert text in error["message"], response.text


@pytest.mark.parametrize("name", ["EPS", "PDF"])
def test_server_refuses_eps_and_pdf_by_name_without_running_ghostscript(server: ServerProcess, name: str) -> None:
    expect_error(classify(server, f"upload.{name.lower()}", OTHER_FORMATS[name]), 415, "unsupported_media_type", name)
    marker = Path(server.env["PATH"].split(os.pathsep)[0]).parent / "gs-ran"
    assert not marker.exists(), "the server ran the gs on its PATH"
    assert "ghostscript" not in server.log().lower()


HEADER_BOMBS = {"icon.ico": (ICO_BOMB, "9000×9000"), "anim.webp": (WEBP_BOMB, "6000×6000")}


@pytest.mark.parametrize("name", HEADER_BOMBS)
def test_server_refuses_embedded_and_canvas_bombs_before_decoding(server: ServerProcess, name: str) -> None:
    data, size = HEADER_BOMBS[name]
    response, seconds, growth = classify_measured(server, name, data)
    expect_error(response, 413, "image_too_large", size)
    # Decoding the icon's PNG took ~1 s and ~300 MiB; refusing from headers takes milliseconds and nothing.
    assert growth < 48 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB"
    assert seconds < 1.0, f"{seconds:.2f} s"


@pytest.mark.parametrize("name", ["PSD", "SPIDER", "ICO-bmp", "TGA"])
def test_server_classifies_single_frame_psd_spider_and_others(server: ServerProcess, name: str) -> None:
    response = classify(server, name.lower(), ACCEPTED[name])
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]["predictions"]) == 5


def test_server_names_a_12_bit_jpeg_as_unsupported(server: ServerProcess) -> None:
    expect_error(classify(server, "deep.jpg", JPEG_12_BIT), 415, "unsupported_media_type", "12-bit JPEG")


def test_server_logs_a_library_warning_as_a_json_record(server: ServerProcess) -> None:
    assert classify(server, "odd.png", png_with_invalid_animation(PHOTO)).status_code == 200
    warned = [r for r in server.log_records() if r.get("logger") == "py.warnings"]
    assert any("Invalid APNG" in str(r["message"]) for r in warned), server.log()[-2000:]


def test_server_log_holds_only_json_lines(server: ServerProcess) -> None:
    """Last in this module: after every hostile upload above (and whatever else the shared server has answered),
    plus an icon with a wrong directory."""
    assert classify(server, "wrong.ico", ico_holding(encode(PHOTO, "PNG"))).status_code == 200
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line
    assert "expected size" not in server.log()
