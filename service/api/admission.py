"""What every front door shares: the app's run-time state, FastAPI dependencies, JSON responses, and the admission of
a request (refusals before the body is read, its deadline and cancel signal, its share of the upload budget)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from torch import Tensor

from service.engine.context import RequestContext
from service.engine.decode_pool import DecodePool
from service.engine.lifecycle import Lifecycle
from service.engine.served import Inputs, Prediction, RequestStats, ServedModel
from service.engine.store import ModelStore
from service.http.access_log import request_arrival
from service.http.auth import check_api_key
from service.http.body import read_body, read_uploads, watch_disconnect
from service.http.upload_budget import Reservation, UploadBudget
from service.images import EncodedImage
from service.metrics import Metrics
from service.settings import Settings
from service.tracing import RequestTrace, Tracing, span


@dataclass
class AppState:
    """Built by the lifespan; reached through the ``State`` dependency."""

    settings: Settings
    metrics: Metrics
    lifecycle: Lifecycle
    store: ModelStore
    decode_pool: DecodePool
    upload_budget: UploadBudget
    tracing: Tracing | None = None  # --otlp-endpoint


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
        with span(self.context.trace, "read body"):
            return await read_body(self.request, self.state.settings.max_upload_bytes, self.context, self.reservation)

    async def uploads(self) -> list[EncodedImage]:
        s = self.state.settings
        with span(self.context.trace, "read body"):
            return await read_uploads(self.request, s.max_upload_bytes, s.max_files, self.context, self.reservation)

    async def logits(self, inputs: Inputs) -> Tensor:
        async with watch_disconnect(self.request, self.context):
            return await self.served.logits(inputs, self.context, self.stats)

    async def classify(self, inputs: Inputs, top_k: int) -> list[list[Prediction]]:
        async with watch_disconnect(self.request, self.context):
            return await self.served.classify(inputs, top_k=top_k, context=self.context, stats=self.stats)

    async def embed(self, inputs: Inputs, pooling: str | None, normalize: bool) -> Tensor:
        async with watch_disconnect(self.request, self.context):
            return await self.served.embed(
                inputs, pooling=pooling, normalize=normalize, context=self.context, stats=self.stats
            )

    async def outputs(self, inputs: Inputs) -> dict[str, Tensor]:
        """Every output of one forward pass per input (logits and embedding features), for front doors that
        answer several of them at once."""
        async with watch_disconnect(self.request, self.context):
            return await self.served.outputs(inputs, self.context, self.stats)


def accepting_model(state: AppState, name: str | None, version: int | None = None) -> ServedModel:
    """The model a request names (or the default), once the service takes work: 503 while loading or draining
    comes before a 404 for a model not loaded yet."""
    state.lifecycle.check_accepting()
    return state.store.get(name, version)


@contextlib.contextmanager
def admission(
    state: AppState, served: ServedModel, arrival: float, timeout_s: float | None, trace: RequestTrace | None = None
) -> Iterator[tuple[RequestContext, Reservation]]:
    """Every front door's admission, whatever its transport: refuse at once (draining, loading, queue full), then
    count the request as in flight with its deadline (``timeout_s`` or the default, capped by the server) from its
    ``arrival`` (``time.monotonic()``), holding its model version and its share of the upload budget."""
    settings = state.settings
    state.lifecycle.check_accepting()
    served.batcher.check_room(1)
    timeout = min(timeout_s or settings.request_timeout_s, settings.max_request_timeout_s)
    context = RequestContext(arrival + timeout)
    context.trace = trace
    with state.lifecycle.request(context), state.store.hold(served), state.upload_budget.reservation() as reservation:
        yield context, reservation


@contextlib.asynccontextmanager
async def admit(
    request: Request, state: AppState, served: ServedModel, timeout_s: float | None
) -> AsyncIterator[Admitted]:
    """``admission`` of an HTTP request: its model, version and stats also go on the request for its log line."""
    request.state.inference = True
    state.lifecycle.check_accepting()
    request.state.model = served.name
    request.state.version = str(served.version)
    stats = RequestStats()
    trace = getattr(request.state, "trace", None)
    with admission(state, served, request_arrival(request), timeout_s, trace) as (context, reservation):
        request.state.stats = stats
        yield Admitted(request, state, served, context, reservation, stats)
