"""Optional API-key authentication: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import Unauthorized


def presented_key(request: Request) -> str | None:
    return key_of(request.headers.get("authorization"), request.headers.get("x-api-key"))


def key_of(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key in ``Authorization: Bearer <key>`` or ``X-API-Key`` (HTTP headers or gRPC metadata alike)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return x_api_key.strip() if x_api_key is not None else None  # surrounding blanks are not part of a key


def check_api_key(request: Request, keys: tuple[str, ...]) -> None:
    """No keys configured: open. Otherwise the request must present one of them (compared in constant time)."""
    check_key(presented_key(request) if keys else None, keys)


def check_key(key: str | None, keys: tuple[str, ...]) -> None:
    """401 unless no keys are configured or ``key`` is one of them (compared in constant time)."""
    if not keys:
        return
    if key is None:
        raise Unauthorized("an API key is required (Authorization: Bearer <key> or X-API-Key)")
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
        raise Unauthorized("the API key is not valid")
