"""Reading a checkpoint's JSON files (config, preprocessor config): one object, or an error naming the file."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.errors import CheckpointError


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; unreadable, invalid or other JSON is a CheckpointError naming the file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


@contextlib.contextmanager
def naming(source: str) -> Iterator[None]:
    """A CheckpointError raised inside names ``source``, the file whose field it is about."""
    try:
        yield
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e.message}") from e
