"""Wire protocols other clients already speak (Open Inference Protocol, Hugging Face API), over the same engine."""

from __future__ import annotations

from typing import Literal

from starlette.requests import Request

Protocol = Literal["native", "v2", "hf", "grpc"]  # grpc: the Open Inference Protocol on the gRPC port


def protocol_of(path: str) -> Protocol:
    """Which front door a path belongs to: one rule for the metrics' ``protocol`` label and the error shape."""
    if path == "/v2" or path.startswith("/v2/"):
        return "v2"
    if path == "/" or path.startswith("/models/"):
        return "hf"
    return "native"


def plain_error_body(request: Request) -> bool:
    """Whether errors on this path take the ``{"error": "<message>"}`` shape that V2 and Hugging Face clients read."""
    return protocol_of(request.scope.get("path", "")) != "native"
