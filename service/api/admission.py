"""What every front door shares: the app's run-time state, FastAPI dependencies, and the admission of a request
(every refusal before the body is read, once; its deadline and cancel signal; its share of the upload budget), then
its one engine call. Any transport calls the same three steps: ``accepting_model``, ``admission`` (``admit`` for an
HTTP request) and ``Admission.infer``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from service.engine.context import RequestContext
from service.engine.decode_pool import DecodePool
from service.engine.lifecycle import Lifecycle
from service.engine.repository import Repository
from service.engine.served import CLASSIFY, EMBED, Inference, Inputs, RequestStats, ServedModel
from service.engine.store import ModelStore
from service.errors import ModelNotFound
from service.http.access_log import request_record
from service.http.auth import check_api_key
from service.http.body import read_body, read_uploads, watch_disconnect
from service.http.upload_budget import Reservation, UploadBudget
from service.images import EncodedImage
from service.metrics import Metrics
from service.settings import Settings


@dataclass
class AppState:
    """Built by the lifespan; reached through the ``State`` dependency."""

    settings: Settings
    metrics: Metrics
    lifecycle: Lifecycle
    repository: Repository
    decode_pool: DecodePool
    upload_budget: UploadBudget

    @property
    def store(self) -> ModelStore:
        """The registry of served models (the repository's)."""
        return self.repository.store


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
# Routes that need an API key list one of these in their ``dependencies``: the one way auth is attached.
Authorized = Depends(_require_key)
MetricsAuthorized = Depends(_require_metrics_key)
# The ``X-Request-Timeout`` header every inference route takes.
TimeoutHeader = Annotated[
    float | None, Header(gt=0, description="seconds this request may take (capped by the server)")
]


@dataclass
class Admission:
    """A request let in, whatever its transport: its model, one deadline and cancel signal, its share of the upload
    budget, and its one engine call."""

    state: AppState
    served: ServedModel
    context: RequestContext
    reservation: Reservation
    stats: RequestStats

    async def infer(self, inputs: Inputs) -> Inference:
        """The engine call: the forward pass's outputs for every input (``service.api.results`` makes the answer)."""
        return await self.served.infer(inputs, self.context, self.stats)


@dataclass
class Admitted(Admission):
    """A request let in at an HTTP front door: its body is read under the deadline, and a client that disconnects
    stops its engine call."""

    request: Request

    async def body(self) -> bytes:
        return await read_body(self.request, self.state.settings.max_upload_bytes, self.context, self.reservation)

    async def uploads(self) -> list[EncodedImage]:
        s = self.state.settings
        return await read_uploads(self.request, s.max_upload_bytes, s.max_files, self.context, self.reservation)

    async def infer(self, inputs: Inputs) -> Inference:
        async with watch_disconnect(self.request, self.context):
            return await super().infer(inputs)


def version_number(state: AppState, name: str | None, version: int | str | None) -> int | None:
    """A version as a number (a path's ``/versions/{v}`` is text); None for the model's newest loaded one."""
    if isinstance(version, str):
        if not (version.isascii() and version.isdigit()):
            state.store.get(name)  # an unknown model is named as such first
            raise ModelNotFound(f"model {name!r} has no version {version!r}: versions are numbers")
        return int(version)
    return version


def accepting_model(
    state: AppState, name: str | None, version: int | str | None = None, *, task: str = EMBED
) -> ServedModel:
    """The refusals before anything is read, each once: 503 while loading or draining (before a 404 for a model not
    loaded yet), 404 for an unknown model or version, 400 for a task the model does not serve."""
    state.lifecycle.check_accepting()
    served = state.store.get(name, version_number(state, name, version))
    if task == CLASSIFY:
        served.check_classifies()
    return served


@contextlib.contextmanager
def admission(state: AppState, served: ServedModel, *, arrived: float, timeout_s: float | None) -> Iterator[Admission]:
    """Refuse at once when the model's queue is full, before the body is read (the room for all of the request's
    images is reserved when they are queued); then count the request as in flight, holding its model version, with
    its deadline (``timeout_s`` or the default, capped by the server) from its arrival (``time.monotonic()``)."""
    settings = state.settings
    served.check_room(1)
    timeout = min(timeout_s or settings.request_timeout_s, settings.max_request_timeout_s)
    context = RequestContext(arrived + timeout)
    with state.lifecycle.request(context), state.store.hold(served), state.upload_budget.reservation() as reservation:
        yield Admission(state, served, context, reservation, RequestStats())


@contextlib.asynccontextmanager
async def admit(
    request: Request, state: AppState, served: ServedModel, timeout_s: float | None
) -> AsyncIterator[Admitted]:
    """``admission`` for an HTTP request: its access-log record names the model and gets what it saw of batching."""
    record = request_record(request)
    record.model, record.version = served.name, str(served.version)
    with admission(state, served, arrived=record.arrived, timeout_s=timeout_s) as admitted:
        record.batching = admitted.stats
        yield Admitted(state, served, admitted.context, admitted.reservation, admitted.stats, request)
