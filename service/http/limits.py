"""The bounds one client may push the HTTP server to, and the JSON answer the server writes when it refuses."""

from __future__ import annotations

import http
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class HttpLimits:
    """Request head size and header count, time to send the head, and open connections."""

    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    max_connections: int


def error_response(
    status: int, code: str, message: str, default_headers: list[tuple[bytes, bytes]], retry_after: int | None = None
) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 answer with the service's ``{"error": ...}`` JSON body."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())]
    lines += [name + b": " + value + b"\r\n" for name, value in default_headers]
    if retry_after is not None:
        lines.append(b"retry-after: %d\r\n" % retry_after)
    lines.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
    return b"".join(lines) + body
