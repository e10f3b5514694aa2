"""What every front door shares: the app's run-time state, FastAPI dependencies, JSON responses, and the admission of
a request (refusals before the body is read, its deadline and cancel signal, its share of the upload budget)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from torch import Tensor

from service.auth import check_api_key
from service.decode_pool import DecodePool
from service.lifecycle import Lifecycle
from service.metrics import Metrics
from service.middleware import request_arrival
from service.request_context import RequestContext
from service.served import EncodedImage, Inputs, Prediction, RequestStats, ServedModel
from service.settings import Settings
from service.store import ModelStore
from service.upload_budget import Reservation, UploadBudget
from service.uploads import read_body, read_uploads, watch_disconnect


@dataclass
class AppState:
    """Built by the lifespan; reached through the ``State`` dependency."""

    settings: Settings
    metrics: Metrics
    lifecycle: Lifecycle
    store: ModelStore
    decode_pool: DecodePool
    upload_budget: UploadBudget


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.deit
    return state


# Dependencies are coroutines: FastAPI runs plain functions in its thread pool, a thread hop per request each.
async def _state(request: Request) -> AppState:
    return app_state(request)


async def _require_key(request: Request) -> None:
    check_api_key(request, app_state(request).settings.api_keys)


async def _require_metrics_key(request: Request) -> None:
    settings = app_state(request).settings
    if settings.protect_metrics:
        check_api_key(request, settings.api_keys)


State = Annotated[AppState, Depends(_state)]
Authorized = Depends(_require_key)
MetricsAuthorized = Depends(_require_metrics_key)


@dataclass
class Admitted:
    """A request let in at a front door: read its body and run it on its model, under its one deadline."""

    request: Request
    state: AppState
    served: ServedModel
    context: RequestContext
    reservation: Reservation
    stats: RequestStats

    async def body(self) -> bytes:
        return await read_body(self.request, self.state.settings.max_upload_bytes, self.context, self.reservation)

    async def uploads(self) -> list[EncodedImage]:
        s = self.state.settings
        return await read_uploads(self.request, s.max_upload_bytes, s.max_files, self.context, self.reservation)

    async def logits(self, inputs: Inputs) -> Tensor:
        async with watch_disconnect(self.request, self.context):
            return await self.served.logits(inputs, self.context, self.stats)

    async def classify(self, inputs: Inputs, top_k: int) -> list[list[Prediction]]:
        async with watch_disconnect(self.request, self.context):
            return await self.served.classify(inputs, top_k=top_k, context=self.context, stats=self.stats)


def accepting_model(state: AppState, name: str | None) -> ServedModel:
    """The model a request names (or the default), once the service takes work: 503 while loading or draining
    comes before a 404 for a model not loaded yet."""
    state.lifecycle.check_accepting()
    return state.store.get(name)


@contextlib.asynccontextmanager
async def admit(
    request: Request, state: AppState, served: ServedModel, timeout_s: float | None
) -> AsyncIterator[Admitted]:
    """Refuse at once (draining, loading, queue full) before the body is read; then count the request as in flight
    with its deadline (``timeout_s`` or the default, capped by the server) from its arrival."""
    settings = state.settings
    state.lifecycle.check_accepting()
    request.state.model = served.name
    served.batcher.check_room(1)
    timeout = min(timeout_s or settings.request_timeout_s, settings.max_request_timeout_s)
    context = RequestContext(request_arrival(request) + timeout)
    stats = RequestStats()
    request.state.stats = stats
    with state.lifecycle.request(context), state.upload_budget.reservation() as reservation:
        yield Admitted(request, state, served, context, reservation, stats)


try:
    import orjson

    def dumps(body: Any) -> bytes:
        return orjson.dumps(body)

except ImportError:  # the "fast" extra is optional

    def dumps(body: Any) -> bytes:
        return json.dumps(body, separators=(",", ":")).encode()


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status_code=status_code, headers=headers, media_type="application/json")
