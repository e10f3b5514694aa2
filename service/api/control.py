"""Requests that change the model repository: their small JSON bodies, read by the handler itself once the route's
dependencies (authentication first) have let the request in (never by FastAPI before them, never unbounded), and
their lifetime, counted in flight so that a drain waits for them and an abandoned one answers them."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Request

from service.api.admission import AppState
from service.engine.context import RequestContext
from service.errors import Forbidden, InvalidParameter
from service.http.access_log import request_arrival
from service.http.body import read_body
from service.http.json_body import loads_bounded
from service.model.hub import parse_ref

# A control request is a few flags; anything longer is not one.
MAX_CONTROL_BODY_BYTES = 64 * 1024
# The store bounds each version's load (--load-timeout-s); this deadline only has to outlast a load of many.
_CONTROL_DEADLINE_S = 24 * 3600.0

T = TypeVar("T")


async def read_control_json(request: Request, state: AppState, what: str) -> Any:
    """The body as JSON (None when empty): at most ``MAX_CONTROL_BODY_BYTES``, in the upload byte budget, within
    the request's deadline; 413/400/408 naming the problem."""
    settings = state.settings
    context = RequestContext(request_arrival(request) + min(settings.request_timeout_s, settings.max_request_timeout_s))
    with state.upload_budget.reservation() as reservation:
        body = await read_body(request, MAX_CONTROL_BODY_BYTES, context, reservation)
    if not body.strip():
        return None
    return loads_bounded(body, what)


async def run_control(state: AppState, work: Coroutine[Any, Any, T]) -> T:
    """Run a load or unload as a request in flight: the drain waits for it, and when the drain runs out of time it
    is answered 503 (the load goes on in its abandoned thread, the process exits) instead of being cut off."""
    context = RequestContext.with_timeout(_CONTROL_DEADLINE_S)
    with state.lifecycle.request(context):
        return await context.run(work)


async def load_model(state: AppState, name: str, hub_id: str | None) -> None:
    """A repository load over any transport: ``name`` from the store, or the model ``hub_id`` names (when the
    operator allows downloads), run in flight."""
    state.lifecycle.check_accepting()
    if hub_id is None:
        await run_control(state, state.repository.load(name))
        return
    if not state.settings.allow_hub_ids:
        raise Forbidden("loading a model by hub id is off; the operator allows it with --allow-hub-ids")
    try:
        ref = parse_ref(hub_id)
    except ValueError as e:
        raise InvalidParameter(f"parameters.hub_id: {e}") from e
    await run_control(state, state.repository.load_hub(name, ref))


async def unload_model(state: AppState, name: str) -> None:
    """A repository unload over any transport, run in flight."""
    state.lifecycle.check_accepting()
    await run_control(state, state.repository.unload(name))
