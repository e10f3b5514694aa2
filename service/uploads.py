"""Reading image uploads from a request body, with the size and file-count limits enforced while streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import python_multipart
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import BadRequest, ClientGone, EmptyUpload, PayloadTooLarge, TooManyFiles, UnsupportedMediaType

FILE_FIELD = "file"


@dataclass
class Upload:
    filename: str
    data: bytes


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)
    header_name: bytes = b""
    header_value: bytes = b""
    disposition: bytes = b""


async def _limited(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The body, chunk by chunk; 413 as soon as it passes ``max_bytes`` (the rest is never read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {max_bytes}")
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > max_bytes:
                raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
            yield chunk
    except ClientDisconnect as e:
        raise ClientGone("the client disconnected while sending") from e


async def read_uploads(request: Request, max_bytes: int, max_files: int) -> list[Upload]:
    """Images of a multipart upload (repeated field ``file``) or of a raw ``image/*`` body."""
    content_type = request.headers.get("content-type", "")
    media_type, params = parse_options_header(content_type)
    if media_type == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise BadRequest("multipart body without a boundary in its Content-Type")
        uploads = await _read_multipart(_limited(request, max_bytes), boundary, max_files)
    elif media_type.startswith(b"image/") or media_type == b"application/octet-stream":
        body = bytearray()
        async for chunk in _limited(request, max_bytes):
            body.extend(chunk)
        uploads = [Upload(request.headers.get("x-filename", "image"), bytes(body))]
    else:
        raise UnsupportedMediaType(
            f"Content-Type {content_type or 'missing'!r} is not accepted: send multipart/form-data with one or more "
            f"'{FILE_FIELD}' fields, or a single image with Content-Type image/*"
        )
    if not uploads:
        raise EmptyUpload(f"no files in the upload: send one or more images in the multipart field '{FILE_FIELD}'")
    return uploads


async def _read_multipart(stream: AsyncIterator[bytes], boundary: bytes, max_files: int) -> list[Upload]:
    uploads: list[Upload] = []
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
            uploads.append(Upload(part.filename or f"file{len(uploads)}", bytes(part.data)))

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
    return uploads
