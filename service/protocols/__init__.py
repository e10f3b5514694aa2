"""Wire protocols other clients already speak (Open Inference Protocol, Hugging Face API), over the same engine."""

from __future__ import annotations

from starlette.requests import Request


def plain_error_body(request: Request) -> bool:
    """Whether errors on this path take the ``{"error": "<message>"}`` shape that V2 and Hugging Face clients read."""
    path: str = request.scope.get("path", "")
    return path == "/" or path == "/v2" or path.startswith(("/v2/", "/models/"))
