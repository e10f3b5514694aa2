"""JSON response bodies, encoded with orjson when the ``fast`` extra is installed."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

try:
    import orjson

    def dumps(body: Any) -> bytes:
        return orjson.dumps(body)

except ImportError:  # the "fast" extra is optional

    def dumps(body: Any) -> bytes:
        return json.dumps(body, separators=(",", ":")).encode()


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status_code=status_code, headers=headers, media_type="application/json")
