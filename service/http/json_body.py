"""JSON read from a client's bytes with its nesting bounded before it is parsed: no body nests deep enough to
exhaust a parser's recursion (a 500 ``RecursionError``), whatever its size. The check runs in C (bytes methods,
the regex engine, numpy): a body with no more openers than the limit (images in base64) is cleared by counting."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from service.errors import BadRequest

# Deeper than any request of ours needs (an [N, 3, H, W] tensor of pixels nests 5 deep inside its request).
MAX_JSON_DEPTH = 32
# A JSON string, escapes included: what it holds never nests.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_CHUNK = 1 << 20  # brackets summed at a time: a few MiB of work memory, whatever the body


def nests_deeper_than(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``data`` nests more than ``limit`` levels of arrays and objects (brackets inside strings aside)."""
    if data.count(b"[") + data.count(b"{") <= limit:  # no more openers than levels, strings included: done
        return False
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    steps = np.frombuffer(brackets, dtype=np.uint8)
    depth = 0
    for start in range(0, len(steps), _CHUNK):
        chunk = steps[start : start + _CHUNK]
        levels = np.cumsum(np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1).astype(np.int32)) + depth
        if int(levels.max()) > limit:
            return True
        depth = int(levels[-1])
    return False


def loads_bounded(data: bytes, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse ``data`` as JSON; 400 naming ``what`` and the problem when it is not JSON or nests past ``max_depth``."""
    if nests_deeper_than(data, max_depth):
        raise BadRequest(f"{what} nests deeper than {max_depth} levels of arrays and objects")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from e
