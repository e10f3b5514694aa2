"""What the app holds at run time (built by the lifespan), and the JSON response helper."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response

from service.decode_pool import DecodePool
from service.lifecycle import Lifecycle
from service.metrics import Metrics
from service.settings import Settings
from service.store import ModelStore
from service.upload_budget import UploadBudget


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    lifecycle: Lifecycle
    store: ModelStore
    decode_pool: DecodePool
    upload_budget: UploadBudget


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.deit
    return state


try:
    import orjson

    def dumps(body: Any) -> bytes:
        return orjson.dumps(body)

except ImportError:  # the "fast" extra is optional

    def dumps(body: Any) -> bytes:
        return json.dumps(body, separators=(",", ":")).encode()


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status_code=status_code, headers=headers, media_type="application/json")
