"""Optional API-key authentication: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import Unauthorized


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key is not None else None  # surrounding blanks are not part of a key, as for Bearer


def check_api_key(request: Request, keys: tuple[str, ...]) -> None:
    """No keys configured: open. Otherwise the request must present one of them (compared in constant time)."""
    if not keys:
        return
    key = presented_key(request)
    if key is None:
        raise Unauthorized("an API key is required (Authorization: Bearer <key> or X-API-Key)")
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
        raise Unauthorized("the API key is not valid")
