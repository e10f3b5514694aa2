"""The registry of served models: every loaded version of every model, the one a request gets, the requests that
hold each, and the retirement of a replaced or unloaded version.

A replaced version never leaves a request unanswered: the repository installs the new one in one step on the event
loop, and the old one drains (the requests that hold it finish, its batcher stops) before its memory is freed.
Requests still on it when the drain timeout passes are cancelled with a 503 ``model_unloaded``, never cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
from collections.abc import Iterator

import torch

from service.engine.context import RequestContext
from service.engine.loader import info_labels
from service.engine.served import ServedModel
from service.errors import ModelNotFound, ModelRetired
from service.metrics import Metrics

log = logging.getLogger("deit_serve.store")


def release_memory() -> None:
    """Collect the unloaded model's cycles and hand the freed memory back: glibc's heap, and on a GPU the blocks
    torch's caching allocator would otherwise keep for itself."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ModelStore:
    """The loaded versions by model; the newest loaded version of a model answers requests that name none, and
    ``default_model`` (else the first loaded of ``preferred``, else the first model by name) answers requests that
    name no model."""

    def __init__(self, metrics: Metrics, *, default_model: str | None, drain_timeout_s: float) -> None:
        self.metrics = metrics
        self.default_model = default_model
        self.preferred: list[str] = []  # the models given by hub id, in the order given: the first loaded is default
        self.drain_timeout_s = drain_timeout_s
        self.versions: dict[str, dict[int, ServedModel]] = {}
        self.models: dict[str, ServedModel] = {}  # the newest loaded version of each model
        self._live: dict[ServedModel, None] = {}  # every live version, draining ones too, in load order
        self._holds: dict[ServedModel, dict[object, RequestContext | None]] = {}  # the requests on each version
        self._released: dict[ServedModel, asyncio.Event] = {}  # set when the last request on a retiring version ends
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def default_name(self) -> str | None:
        first_preferred = next((n for n in self.preferred if n in self.models), None)
        return self.default_model or first_preferred or min(self.models, default=None)

    def all_served(self) -> list[ServedModel]:
        """Every loaded version, including those draining after a reload or unload."""
        return list(self._live)

    def loaded(self, name: str) -> dict[int, ServedModel]:
        """The loaded versions of ``name`` (none when it is not loaded)."""
        return self.versions.get(name, {})

    # --- requests ----------------------------------------------------------------------------------------------

    def get(self, name: str | None, version: int | None = None) -> ServedModel:
        """The model a request names (or the default), at ``version`` (or its newest loaded one)."""
        key = name or self.default_name
        if key is None:
            raise ModelNotFound("no model is loaded: load one (POST /v2/repository/models/{name}/load)")
        if key not in self.models:
            known = ", ".join(sorted(self.models)) or "none loaded"
            raise ModelNotFound(f"model {key!r} not found; available: {known}")
        if version is None:
            return self.models[key]
        served = self.versions[key].get(version)
        if served is None:
            available = ", ".join(str(v) for v in sorted(self.versions[key]))
            raise ModelNotFound(f"model {key!r} has no version {version!r} loaded; available: {available}")
        return served

    @contextlib.contextmanager
    def hold(self, served: ServedModel, context: RequestContext | None = None) -> Iterator[None]:
        """Count a request on the version it runs on until it is answered: a version replaced or unloaded drains
        until none holds it, and a drain that runs out of time cancels ``context`` (503) rather than free the
        version under it."""
        holders = self._holds.setdefault(served, {})
        token = object()
        holders[token] = context
        try:
            yield
        finally:
            holders.pop(token, None)
            if not holders and served in self._released:
                self._released[served].set()

    # --- changes (on the event loop after start-up) ------------------------------------------------------------

    def install(self, served: ServedModel) -> None:
        """Put a loaded version in place in one step; the version it replaces, if any, retires."""
        versions = self.versions.setdefault(served.name, {})
        old = versions.get(served.version)
        versions[served.version] = served
        self._live[served] = None
        self.models[served.name] = versions[max(versions)]
        if old is not None:
            self.retire(old)

    def remove(self, name: str, version: int) -> None:
        """Stop serving one version: new requests get another (or a 404); it retires."""
        versions = self.versions[name]
        served = versions.pop(version)
        if versions:
            self.models[name] = versions[max(versions)]
        else:
            del self.versions[name], self.models[name]
        self.retire(served)

    def retire(self, served: ServedModel) -> None:
        task = asyncio.create_task(self._drain(served), name=f"retire-{served.name}-{served.version}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain(self, served: ServedModel) -> None:
        """Wait until no request holds the version (at most the drain timeout; then the requests still on it are
        cancelled, 503), stop its batcher, free it."""
        released = self._released.setdefault(served, asyncio.Event())
        if self._holds.get(served):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(released.wait(), self.drain_timeout_s)
        holders = self._holds.get(served, {})
        if holders:  # the drain ran out of time: the requests still on this version end now, with a 503
            log.warning(
                "model drain timeout passed with %d requests on it; they are cancelled",
                len(holders),
                extra={"model": served.name, "version": served.version},
            )
            for context in list(holders.values()):
                if context is not None:
                    context.cancel(ModelRetired(_retired_message(served)))
            with contextlib.suppress(TimeoutError):  # each cancelled request leaves at its next await
                await asyncio.wait_for(released.wait(), self.drain_timeout_s)
        await served.stop()
        self._holds.pop(served, None)
        self._released.pop(served, None)
        self._live.pop(served, None)
        labels = info_labels(served)
        shown = any((m.name, m.version, info_labels(m)) == (served.name, served.version, labels) for m in self._live)
        if not shown:  # a reload of the same files keeps its info series; one from another hub id or dtype does not
            with contextlib.suppress(KeyError):
                self.metrics.model_info.remove(served.name, str(served.version), *labels)
        log.info("model unloaded", extra={"model": served.name, "version": served.version})
        del served
        await asyncio.to_thread(release_memory)

    def abandon(self) -> None:
        """The drain ran out of time: every version answers its queued images 503 now."""
        for served in self.all_served():
            served.abandon()

    async def close(self) -> None:
        """Stop every batcher (the caller drained requests first) and wait for the retiring versions."""
        for served in self.all_served():
            await served.stop()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)


def _retired_message(served: ServedModel) -> str:
    return (
        f"model {served.name!r} version {served.version} was unloaded or replaced before this request finished "
        "(the drain timeout passed); retry"
    )
