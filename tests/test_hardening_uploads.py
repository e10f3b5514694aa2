"""Hostile uploads: size limits enforced while streaming, decompression bombs, corrupt and odd images, and fuzzed
bytes. Every input gets a 4xx JSON answer or a classification; none gets a 500 or takes the server down."""

from __future__ import annotations

import io
import random
import select
import socket
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.errors import ServiceError
from service.model.decoding import decode_image
from service.model.preprocessing import PreprocessConfig, Preprocessor
from tests.serving import SMALL_UPLOADS, ServerProcess, SharedServers, expect_error, image_bytes, read_answer

MAX_BYTES = int(SMALL_UPLOADS["DEIT_MAX_UPLOAD_BYTES"])
MAX_FILES = int(SMALL_UPLOADS["DEIT_MAX_FILES"])
MAX_PIXELS = int(SMALL_UPLOADS["DEIT_MAX_IMAGE_PIXELS"])


@pytest.fixture(scope="module")
def server(tiny_store: Path, servers: SharedServers) -> ServerProcess:
    return servers.get(tiny_store, SMALL_UPLOADS)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def classify(server: ServerProcess, files: list[tuple[str, bytes]]) -> httpx.Response:
    return httpx.post(
        f"{server.url}/classify", files=[("file", (name, data, "application/octet-stream")) for name, data in files]
    )


# --- size limits while streaming --------------------------------------------------------------------------------


def test_an_endless_chunked_body_is_refused_after_the_limit_not_read_to_its_end(server: ServerProcess) -> None:
    offered = 256 * 2**20
    pulled = 0

    def endless() -> Iterator[bytes]:
        nonlocal pulled
        chunk = bytes(64 * 1024)
        while pulled < offered:
            pulled += len(chunk)
            yield chunk

    response = httpx.post(
        f"{server.url}/classify", content=endless(), headers={"Content-Type": "image/png"}, timeout=30
    )
    expect_error(response, 413, "payload_too_large")
    assert response.headers["connection"] == "close"
    # What left the generator: the limit, plus what the two sockets' kernel buffers took before the server closed.
    assert pulled < 32 * 2**20, f"{pulled / 2**20:.0f} MiB of {offered / 2**20:.0f} MiB were sent"
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_a_multipart_file_over_the_limit_is_refused_while_streaming(server: ServerProcess) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'.encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST /classify HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
        )
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        chunk = bytes(64 * 1024)
        sent, answered = 0, False
        while sent < 256 * 2**20 and not answered:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server closed the connection after answering
                break
            sent += len(chunk)
            answered = bool(select.select([sock], [], [], 0)[0])
        status, body = read_answer(sock)
    assert (status, body["error"]["code"]) == (413, "payload_too_large")
    assert sent < 32 * 2**20


def test_a_declared_oversized_body_is_refused_before_it_is_sent(server: ServerProcess) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {100 * 2**20}\r\n\r\n".encode()
        )
        status, body = read_answer(sock)  # no body byte was sent: the answer cannot have waited for it
    assert (status, body["error"]["code"]) == (413, "payload_too_large")
    assert "exceeds the limit" in body["error"]["message"]


def test_too_many_files_in_one_request(server: ServerProcess) -> None:
    files = [(f"{i}.png", image_bytes()) for i in range(MAX_FILES + 1)]
    expect_error(classify(server, files), 413, "too_many_files")
    assert classify(server, files[:MAX_FILES]).status_code == 200


# --- decompression bombs --------------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming ``width``×``height`` 1-bit pixels, with almost no data: decoding it would allocate them all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen size
    return bytes(data)


BOMBS = {
    # Over our limit only; over Pillow's warning threshold; over Pillow's error threshold.
    "png-25M": png_header_only(5_000, 5_000),
    "png-100M": png_header_only(10_000, 10_000),
    "png-900M": png_header_only(30_000, 30_000),
    "gif-4G": gif_claiming(65_535, 65_535),
    "real-png-9M": encode(Image.new("1", (3_000, 3_000)), "PNG"),
}


@pytest.mark.parametrize("name", BOMBS)
def test_decompression_bombs_are_refused_as_too_large(server: ServerProcess, name: str) -> None:
    assert len(BOMBS[name]) < MAX_BYTES
    expect_error(classify(server, [(name, BOMBS[name])]), 413, "image_too_large")


def test_bombs_leave_no_pillow_warning_in_the_log(server: ServerProcess) -> None:
    for name, data in BOMBS.items():
        classify(server, [(name, data)])
    assert "DecompressionBomb" not in "".join(line for line in server.log().splitlines() if not line.startswith("{"))


# --- corrupt, truncated, empty and non-images -------------------------------------------------------------------


def corrupt_idat(png: bytes) -> bytes:
    start = png.index(b"IDAT") + 8
    return png[:start] + bytes(b ^ 0x5A for b in png[start : start + 16]) + png[start + 16 :]


PHOTO = Image.radial_gradient("L").convert("RGB").resize((64, 48))
PNG = encode(PHOTO, "PNG")
JPEG = encode(PHOTO, "JPEG", quality=90)
DDS = encode(PHOTO.convert("RGBA"), "DDS")


def dds_with_pixel_format_flags(flags: int) -> bytes:
    """A DDS whose pixel-format flags (offset 80) name no format: Pillow raises NotImplementedError on it."""
    return DDS[:80] + struct.pack("<I", flags) + DDS[84:]


REFUSED = {
    "truncated-png": (PNG[: len(PNG) // 2], 422, "invalid_image"),
    "truncated-jpeg": (JPEG[: len(JPEG) // 2], 422, "invalid_image"),
    "corrupt-png-data": (corrupt_idat(PNG), 422, "invalid_image"),
    "png-signature-only": (PNG[:8], 422, "invalid_image"),
    "dds-unknown-pixel-format": (dds_with_pixel_format_flags(0x40000000), 415, "unsupported_media_type"),
    "zero-bytes": (b"", 422, "empty_upload"),
    "text": (b"hello, this is not an image\n" * 10, 415, "unsupported_media_type"),
    "pdf": (b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", 415, "unsupported_media_type"),
    "html": (b"<!doctype html><html><body><img src=x></body></html>", 415, "unsupported_media_type"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_unreadable_uploads_are_refused_clearly(server: ServerProcess, name: str) -> None:
    data, status, code = REFUSED[name]
    expect_error(classify(server, [(name, data)]), status, code)


def test_an_empty_raw_body_is_refused(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/classify", content=b"", headers={"Content-Type": "image/png"})
    expect_error(response, 422, "empty_upload")


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", ""])
def test_a_body_that_is_not_an_upload_is_refused(server: ServerProcess, content_type: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = httpx.post(f"{server.url}/classify", content=b'{"image": "x"}', headers=headers)
    expect_error(response, 415, "unsupported_media_type")


def test_a_malformed_multipart_body_is_a_bad_request(server: ServerProcess) -> None:
    headers = {"Content-Type": "multipart/form-data; boundary=abc"}
    response = httpx.post(f"{server.url}/classify", content=b"--abc\r\nno headers end here", headers=headers)
    assert response.status_code in (400, 422), response.text
    assert response.status_code < 500


# --- odd modes: converted like the RGB image they show ------------------------------------------------------------


def two_tone(left: tuple[float, ...], right: tuple[float, ...], mode: str) -> Image.Image:
    image = Image.new(mode, (48, 40), left)
    image.paste(right, (24, 0, 48, 40))
    return image


def transparent_palette() -> Image.Image:
    image = Image.new("P", (48, 40), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (24, 0, 48, 40))
    image.info["transparency"] = 0
    return image


def i16(left: int, right: int) -> Image.Image:
    return two_tone((left * 257,), (right * 257,), "I;16")


def two_frame_gif() -> bytes:
    first, second = Image.new("RGB", (48, 40), (250, 20, 20)), Image.new("RGB", (48, 40), (20, 20, 250))
    return encode(first, "GIF", save_all=True, append_images=[second])


ODD_MODES = {
    # name: (upload, the RGB image it shows, or None where lossy)
    "LA": (encode(two_tone((90, 255), (200, 255), "LA"), "PNG"), two_tone((90,) * 3, (200,) * 3, "RGB")),
    "P+transparency": (encode(transparent_palette(), "PNG"), two_tone((255,) * 3, (0, 0, 255), "RGB")),
    "I;16": (encode(i16(30, 220), "PNG"), two_tone((30,) * 3, (220,) * 3, "RGB")),
    "1-bit": (encode(two_tone((0,), (1,), "1"), "PNG"), two_tone((0,) * 3, (255,) * 3, "RGB")),
    "RGBA-webp": (
        encode(two_tone((9, 99, 199, 255), (1, 2, 3, 255), "RGBA"), "WEBP", lossless=True),
        two_tone((9, 99, 199), (1, 2, 3), "RGB"),
    ),
    "animated-gif": (two_frame_gif(), Image.new("RGB", (48, 40), (250, 20, 20))),
    "CMYK-jpeg": (encode(two_tone((0, 200, 100, 0), (50, 0, 0, 30), "CMYK"), "JPEG"), None),
    "F-tiff": (encode(two_tone((0.1,), (0.9,), "F"), "TIFF"), None),
}


@pytest.mark.parametrize("name", ODD_MODES)
def test_odd_modes_are_converted_to_the_rgb_they_show(server: ServerProcess, name: str) -> None:
    upload, shown = ODD_MODES[name]
    response = classify(server, [(name, upload)])
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    assert len(result["predictions"]) == 5
    if shown is not None:
        [reference] = classify(server, [("rgb.png", encode(shown, "PNG"))]).json()["results"]
        for got, want in zip(result["predictions"], reference["predictions"], strict=True):
            assert got["label"] == want["label"]
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)


# --- fuzzing -----------------------------------------------------------------------------------------------------

SEEDS = {
    "PNG": encode(PHOTO, "PNG"),
    "JPEG": JPEG,
    "GIF": encode(PHOTO, "GIF"),
    "BMP": encode(PHOTO, "BMP"),
    "TIFF": encode(PHOTO, "TIFF", compression="tiff_lzw"),
    "WEBP": encode(PHOTO, "WEBP", quality=80),
    "PNG-RGBA": encode(PHOTO.convert("RGBA"), "PNG"),
    "JPEG-CMYK": encode(PHOTO.convert("CMYK"), "JPEG"),
    "DDS": DDS,
}
FIXED = Preprocessor(PreprocessConfig.for_image_size(32))
SHORTEST_EDGE = Preprocessor(PreprocessConfig(shortest_edge=40, crop_height=32, crop_width=32))


def mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """``(kind, position, payload)``: 0 flips a bit, 1 truncates, 2 inserts ``payload``, 3 overwrites with it."""
    out = bytearray(data)
    for kind, position, payload in edits:
        at = position % (len(out) + 1)
        if kind == 0 and out:
            out[at % len(out)] ^= 1 << (payload[0] % 8 if payload else 0)
        elif kind == 1:
            del out[at:]
        elif kind == 2:
            out[at:at] = payload
        else:
            out[at : at + len(payload)] = payload
    return bytes(out)


def decode_or_refuse(data: bytes, preprocessor: Preprocessor) -> None:
    """The decode path either yields the model's input or a client error; never another exception."""
    refusal: ServiceError | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's warnings on corrupt metadata are printed in production, not raised
        try:
            pixels = preprocessor(decode_image(data, MAX_PIXELS))
        except ServiceError as e:
            refusal = e
    if refusal is not None:
        assert 400 <= refusal.status_code < 500, f"{type(refusal).__name__}: {refusal.message}"
        return
    assert pixels.shape == (3, 32, 32)
    assert bool(torch.isfinite(pixels).all())


EDITS = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 2**16), st.binary(min_size=1, max_size=12)), min_size=1, max_size=4
)
FUZZ = settings(max_examples=150, derandomize=True, database=None, deadline=None)


@FUZZ
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_never_escape_as_a_server_error(data: bytes) -> None:
    decode_or_refuse(data, FIXED)


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), edits=EDITS, shortest_edge=st.booleans())
def test_mutated_images_never_escape_as_a_server_error(
    seed: str, edits: list[tuple[int, int, bytes]], shortest_edge: bool
) -> None:
    decode_or_refuse(mutate(SEEDS[seed], edits), SHORTEST_EDGE if shortest_edge else FIXED)


@settings(max_examples=60, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(width=st.integers(1, 4000), height=st.integers(1, 4000))
def test_extreme_aspect_ratios_are_resized_or_refused(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        width = max(1, MAX_PIXELS // height)
    decode_or_refuse(encode(Image.new("L", (width, height)), "PNG"), SHORTEST_EDGE)


def test_a_shortest_edge_resize_of_a_thin_strip_is_refused_not_allocated() -> None:
    strip = encode(Image.new("1", (MAX_PIXELS, 1)), "PNG")
    with pytest.raises(ServiceError) as refused:
        SHORTEST_EDGE(decode_image(strip, MAX_PIXELS))
    assert refused.value.code == "image_too_large"


def test_mutated_uploads_over_http_get_4xx_or_200_and_the_server_stays_up(server: ServerProcess) -> None:
    rng = random.Random(20240611)
    statuses = set()
    for i in range(24):
        seed = SEEDS[sorted(SEEDS)[i % len(SEEDS)]]
        edits = [(rng.randrange(4), rng.randrange(len(seed)), rng.randbytes(rng.randint(1, 8))) for _ in range(3)]
        response = classify(server, [(f"fuzz{i}", mutate(seed, edits))])
        statuses.add(response.status_code)
        assert response.status_code in (200, 413, 415, 422), response.text
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert classify(server, [("ok.png", PNG)]).status_code == 200
    assert statuses - {200}, "no mutation was refused: the fuzz did not reach the decoder's error paths"
