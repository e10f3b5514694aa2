"""Reading image uploads from a request body: size, file-count, byte-budget and time limits enforced while streaming."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import python_multipart
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartState, parse_options_header
from starlette.requests import Request

from service.engine.context import RequestContext
from service.errors import (
    BadRequest,
    ClientGone,
    EmptyUpload,
    PayloadTooLarge,
    RequestTimeout,
    TooManyFiles,
    UnsupportedMediaType,
)
from service.http.upload_budget import Reservation
from service.images import EncodedImage

FILE_FIELD = "file"


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)
    header_name: bytes = b""
    header_value: bytes = b""
    disposition: bytes = b""


def _body_too_slow() -> RequestTimeout:
    return RequestTimeout("the request body was not received before the request's deadline")


async def _limited(
    request: Request, max_bytes: int, context: RequestContext, reservation: Reservation
) -> AsyncIterator[bytes]:
    """The body, chunk by chunk, within the request's deadline; 413 as soon as it passes ``max_bytes`` (the rest is
    never read). Its bytes are reserved in the upload budget before they are read: all at once when the length is
    declared, else as they arrive."""
    declared_header = request.headers.get("content-length")
    declared = (
        int(declared_header)
        if declared_header is not None and declared_header.isascii() and declared_header.isdigit()
        else None
    )
    if declared is not None and declared > max_bytes:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {max_bytes}")
    if declared is not None:
        reservation.grow(declared)
    receive = request.receive
    seen = 0
    while True:
        message = await context.run(receive(), _body_too_slow)
        if message["type"] == "http.disconnect":
            raise ClientGone("the client disconnected while sending")
        chunk: bytes = message.get("body", b"")
        seen += len(chunk)
        if seen > max_bytes:
            raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
        if declared is None:
            reservation.grow(len(chunk))
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def read_body(request: Request, max_bytes: int, context: RequestContext, reservation: Reservation) -> bytes:
    """The whole body as it came, for protocols that parse it themselves; under the same limits as uploads."""
    data = bytearray()
    async for chunk in _limited(request, max_bytes, context, reservation):
        data.extend(chunk)
    return bytes(data)


async def read_uploads(
    request: Request, max_bytes: int, max_files: int, context: RequestContext, reservation: Reservation
) -> list[EncodedImage]:
    """Images of a multipart upload (repeated field ``file``) or of a raw ``image/*`` body."""
    content_type = request.headers.get("content-type", "")
    media_type, params = parse_options_header(content_type)
    if media_type == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise BadRequest("multipart body without a boundary in its Content-Type")
        uploads = await _read_multipart(_limited(request, max_bytes, context, reservation), boundary, max_files)
    elif media_type.startswith(b"image/") or media_type == b"application/octet-stream":
        data = await read_body(request, max_bytes, context, reservation)
        uploads = [EncodedImage(request.headers.get("x-filename", "image"), data)]
    else:
        raise UnsupportedMediaType(
            f"Content-Type {content_type or 'missing'!r} is not accepted: send multipart/form-data with one or more "
            f"'{FILE_FIELD}' fields, or a single image with Content-Type image/*"
        )
    if not uploads:
        raise EmptyUpload(f"no files in the upload: send one or more images in the multipart field '{FILE_FIELD}'")
    return uploads


async def _read_multipart(stream: AsyncIterator[bytes], boundary: bytes, max_files: int) -> list[EncodedImage]:
    uploads: list[EncodedImage] = []
    part = _Part()

    def on_part_begin() -> None:
        nonlocal part
        part = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part.header_name += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part.header_value += data[start:end]

    def on_header_end() -> None:
        if part.header_name.lower() == b"content-disposition":
            part.disposition = part.header_value
        part.header_name, part.header_value = b"", b""

    def on_headers_finished() -> None:
        _, options = parse_options_header(part.disposition)
        part.name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        if part.name == FILE_FIELD and len(uploads) + 1 > max_files:
            raise TooManyFiles(f"more than {max_files} files in one request")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part.name == FILE_FIELD:  # other fields are ignored, not buffered
            part.data += data[start:end]

    def on_part_end() -> None:
        if part.name == FILE_FIELD:
            uploads.append(EncodedImage(part.filename or f"file{len(uploads)}", bytes(part.data)))
            part.data = bytearray()  # one copy of each file at a time, not two

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
    }
    parser = python_multipart.MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as e:
        raise BadRequest(f"malformed multipart body: {e}") from e
    if parser.state != MultipartState.END:
        # python-multipart's finalize() accepts a body cut short; files in it would be lost without a word.
        raise BadRequest(
            f"multipart body ends before its closing boundary (after {len(uploads)} complete file part(s)): "
            "the upload was cut short"
        )
    return uploads


@contextlib.asynccontextmanager
async def watch_disconnect(request: Request, context: RequestContext) -> AsyncIterator[None]:
    """Cancel ``context`` if the client goes away once its body was read (the next ASGI message is then the
    disconnect), so that its images still waiting to be decoded or batched never run."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        context.cancel(ClientGone("the client disconnected before its images ran"))

    watcher = asyncio.create_task(watch(), name="watch-disconnect")
    try:
        yield
    finally:
        watcher.cancel()
