"""JSON response bodies, encoded with orjson when the ``fast`` extra is installed.

Every JSON body goes through ``dumps``, so it is the one place where client text echoed back (an ``id``, a name in
an error message) is made encodable: a lone surrogate, which JSON text may carry but UTF-8 cannot, becomes U+FFFD.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

try:
    import orjson

    def _encode(body: Any) -> bytes:
        return orjson.dumps(body)

    _UNENCODABLE: tuple[type[Exception], ...] = (orjson.JSONEncodeError, UnicodeEncodeError)

except ImportError:  # the "fast" extra is optional

    def _encode(body: Any) -> bytes:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    _UNENCODABLE = (UnicodeEncodeError,)


def dumps(body: Any) -> bytes:
    """UTF-8 JSON of ``body``; strings holding lone surrogates are repaired (a second pass only when one fails)."""
    try:
        return _encode(body)
    except _UNENCODABLE:
        return _encode(_encodable(body))


def _encodable(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings (keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(v) for v in value]
    return value


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status_code=status_code, headers=headers, media_type="application/json")
