"""JSON read from a client's bytes with its nesting bounded before it is parsed: no body nests deep enough to
exhaust a parser's recursion (a 500 ``RecursionError``), whatever its size."""

from __future__ import annotations

import json
import re
from typing import Any

from service.errors import BadRequest

# Deeper than any request of ours needs (an [N, 3, H, W] tensor of pixels nests 5 deep inside its request).
MAX_JSON_DEPTH = 32
# A string (escapes included, skipped whole) or one bracket: all that decides how deep a JSON text nests.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_OPENING = frozenset(b"[{")


def json_depth(data: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep ``data`` nests, counted up to the first level past ``limit`` (then it stops reading)."""
    depth = deepest = 0
    for match in _TOKENS.finditer(data):
        char = data[match.start()]
        if char in _OPENING:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif char != 0x22:  # a closing bracket; a string leaves the depth as it is
            depth -= 1
    return deepest


def loads_bounded(data: bytes | str, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse ``data`` as JSON; 400 naming ``what`` and the problem when it is not JSON or nests past ``max_depth``."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if json_depth(raw, max_depth) > max_depth:
        raise BadRequest(f"{what} nests deeper than {max_depth} levels of arrays and objects")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from e
