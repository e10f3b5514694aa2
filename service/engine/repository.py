"""The model repository: what each version on disk is to the service (READY, LOADING, UNAVAILABLE and why), the
index clients read, and bringing the registry in line with the files: load at start-up, load/reload/unload on
request, and reconcile with the poller's view of the store. A failed load keeps whatever was serving.

Models by Hugging Face hub id (``--model``, or a repository load request naming ``hub_id``) are versions of the
repository beside those of the store directory: version 1 of their name, resolved to a local snapshot by the loader.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass

import torch

from service.engine.daemon_thread import run_in_daemon_thread
from service.engine.decode_pool import DecodePool
from service.engine.loader import Loader, info_labels, version_label
from service.engine.served import ServedModel
from service.engine.store import ModelStore
from service.engine.store_files import Fingerprint, StoreContents, VersionSource, hub_source, scan_model, scan_store
from service.errors import ModelLoadFailed, ModelNotFound, ModelStoreError, RepositoryLoadFailed
from service.metrics import Metrics
from service.model.hub import HubRef, parse_model_option
from service.settings import Settings

log = logging.getLogger("deit_serve.store")

READY, UNAVAILABLE, LOADING = "READY", "UNAVAILABLE", "LOADING"


@dataclass
class VersionEntry:
    """What the repository index says of one version; ``fingerprint`` is that of the files last tried."""

    state: str
    reason: str = ""
    fingerprint: Fingerprint | None = None


class Repository:
    """The versions on disk and their states, over the registry (``store``) that serves the loaded ones."""

    def __init__(self, settings: Settings, store: ModelStore, loader: Loader) -> None:
        self.settings = settings
        self.store = store
        self.loader = loader
        self.entries: dict[str, dict[int, VersionEntry]] = {}
        self.hub_models: dict[str, HubRef] = {}  # by hub id, from the settings or the repository API
        self._lock = asyncio.Lock()

    @classmethod
    def open(cls, settings: Settings, metrics: Metrics, decode_pool: DecodePool) -> Repository:
        """An empty registry and the repository that fills it, as the service's settings say."""
        store = ModelStore(metrics, default_model=settings.default_model, drain_timeout_s=settings.drain_timeout_s)
        threads = settings.torch_threads or torch.get_num_threads()
        return cls(settings, store, Loader(settings, metrics, decode_pool, threads))

    # --- start-up ----------------------------------------------------------------------------------------------

    def load_all(self) -> None:
        """Load every version of every model of the store (blocking; run off the event loop); any failure stops
        start-up, named."""
        s = self.settings
        torch.set_num_threads(1)
        self._set_hub_models(hub_models(s.model))
        contents = scan_store(s.model_store)
        if not contents and not self.hub_models:
            raise ModelStoreError(f"model store {s.model_store} holds no models (one directory or .pth per model)")
        clash = sorted(set(contents) & set(self.hub_models))
        if clash:
            raise ModelStoreError(f"models {clash} are both in the store {s.model_store} and given by hub id")
        contents = self.with_hub_models(contents)
        if s.default_model is not None and s.default_model not in contents:
            raise ModelStoreError(f"default model {s.default_model!r} is not in the store {s.model_store}")
        for name, versions in contents.items():
            for version, source in versions.items():
                self._installed(self.loader.load(name, version, source))

    def with_hub_models(self, contents: StoreContents) -> StoreContents:
        """The store's contents plus the models given by hub id (a store entry of the same name wins)."""
        hub = {name: {1: hub_source(ref)} for name, ref in self.hub_models.items()}
        return {**hub, **contents}

    def _set_hub_models(self, models: dict[str, HubRef]) -> None:
        self.hub_models = models
        self.store.preferred = list(models)  # the first one loaded answers requests that name no model

    def _installed(self, served: ServedModel) -> None:
        """Serve a loaded version; only now is it shown (``deit_model_info``) and its hub commit pinned: a load
        abandoned on its timeout, which may still finish on its thread, leaves no trace."""
        if served.origin is not None:
            self.loader.pins[served.origin.ref] = served.origin.commit
        self.loader.metrics.model_info.labels(served.name, str(served.version), *info_labels(served)).set(1)
        self.store.install(served)
        self.entries.setdefault(served.name, {})[served.version] = VersionEntry(READY, fingerprint=served.fingerprint)

    # --- run time: load, reload, unload, reconcile -------------------------------------------------------------

    async def load(self, name: str) -> None:
        """Load (or reload) the model ``name`` from disk: new and changed versions load, removed ones unload, the
        unchanged ones keep serving. Raises ModelNotFound when the store holds no such model, and
        RepositoryLoadFailed (after applying the versions that did load) when one failed."""
        async with self._lock:
            found = await asyncio.to_thread(scan_model, self.settings.model_store, name)
            if found is None and name in self.hub_models:
                found = {1: hub_source(self.hub_models[name])}
            if found is None:
                raise ModelNotFound(f"the model store holds no model {name!r}")
            await self._apply(name, found, retry=True)

    async def load_hub(self, name: str, ref: HubRef) -> None:
        """Load (or reload) ``name`` from the hub at run time (the repository API, when the operator allows ids)."""
        async with self._lock:
            if await asyncio.to_thread(scan_model, self.settings.model_store, name) is not None:
                raise RepositoryLoadFailed(f"{name!r} is a model of the store; a model by hub id needs another name")
            previous = self.hub_models.get(name)
            self._set_hub_models({**self.hub_models, name: ref})
            try:
                await self._apply(name, {1: hub_source(ref)}, retry=True)
            except BaseException:  # failed or cancelled: what served before (if anything) still serves, its own id
                if previous is not None:
                    self._set_hub_models({**self.hub_models, name: previous})
                elif name not in self.store.models:
                    self._set_hub_models({n: r for n, r in self.hub_models.items() if n != name})
                    self.entries.pop(name, None)
                raise

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name``: requests that hold one finish, then its memory is freed."""
        async with self._lock:
            known = name in self.store.versions or name in self.entries
            if not known and await asyncio.to_thread(scan_model, self.settings.model_store, name) is None:
                raise ModelNotFound(f"model {name!r} not found")
            for version in list(self.store.loaded(name)):
                self._remove(name, version, "unloaded")
            for entry in self.entries.get(name, {}).values():
                entry.state, entry.reason = UNAVAILABLE, "unloaded"

    async def sync(self, contents: StoreContents) -> None:
        """Bring the store in line with the files (the poller): load what is new or changed, unload what is gone.
        A version that failed, or that was unloaded, is left alone until its files change."""
        async with self._lock:
            contents = self.with_hub_models(contents)  # under the lock: a load by hub id may have changed them
            for name in sorted(set(self.store.versions) | set(self.entries)):
                if name not in contents:
                    for version in list(self.store.loaded(name)):
                        self._remove(name, version, "removed from the model store")
                    self.entries.pop(name, None)
            for name, found in sorted(contents.items()):
                with contextlib.suppress(RepositoryLoadFailed):  # reported in the index and the log
                    await self._apply(name, found, retry=False)

    async def _apply(self, name: str, found: dict[int, VersionSource], *, retry: bool) -> None:
        loaded = self.store.loaded(name)
        entries = self.entries.setdefault(name, {})
        for version in [v for v in loaded if v not in found]:
            self._remove(name, version, "removed from the model store")
        for version in [v for v in entries if v not in found and v not in loaded]:
            del entries[version]
        wanted = []
        for version, source in found.items():
            current = loaded.get(version)
            if current is not None and current.fingerprint == source.fingerprint:
                continue
            tried = entries.get(version)
            if not retry and tried is not None and tried.fingerprint == source.fingerprint:
                continue
            wanted.append((version, source))
        failures = []
        for version, source in wanted:
            entry = entries.setdefault(version, VersionEntry(LOADING))
            previous_state = READY if version in loaded else UNAVAILABLE
            entry.state, entry.reason = LOADING, ""
            try:
                served = await self._load_in_thread(name, version, source)
            except asyncio.CancelledError:  # the request asking for it was cancelled (the service shuts down)
                entries[version] = VersionEntry(previous_state, "the load was cancelled before it finished")
                raise
            except ModelLoadFailed as e:
                reason = e.message if version not in loaded else f"reload failed, the loaded files serve: {e.message}"
                entries[version] = VersionEntry(previous_state, reason, source.fingerprint)
                log.error(
                    "model load failed: %s",
                    e.message,
                    extra={"code": e.code, "model": name, "version": version, "source": e.source},
                )
                failures.append(e.message)
                continue
            served.start()
            self._installed(served)
        if failures:
            raise RepositoryLoadFailed("; ".join(failures))

    async def _load_in_thread(self, name: str, version: int, source: VersionSource) -> ServedModel:
        """Load one version on a daemon thread of its own (see ``daemon_thread``) within the load timeout; past it
        the load fails (its thread is abandoned, and what it builds is dropped), and a cancelled caller (an
        abandoned drain) never waits for it."""
        timeout = self.settings.load_timeout_s
        load = functools.partial(_load_alone, self.loader, name, version, source)
        try:
            return await asyncio.wait_for(run_in_daemon_thread(load, f"load-{name}"), timeout)
        except TimeoutError:
            reason = f"loading and warm-up did not finish within {timeout:g} s"
            raise ModelLoadFailed(version_label(name, version), str(source.path), reason) from None

    def _remove(self, name: str, version: int, reason: str) -> None:
        self.store.remove(name, version)
        entry = self.entries.setdefault(name, {}).setdefault(version, VersionEntry(UNAVAILABLE))
        entry.state, entry.reason = UNAVAILABLE, reason

    # --- the index ---------------------------------------------------------------------------------------------

    async def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """The repository index: every version on disk or loaded, with its state and the reason for it."""
        contents = self.with_hub_models(await asyncio.to_thread(scan_store, self.settings.model_store))
        rows = []
        for name in sorted(set(contents) | set(self.store.versions)):
            versions = sorted(set(contents.get(name, {})) | set(self.store.loaded(name)))
            for version in versions:
                entry = self.entries.get(name, {}).get(version) or VersionEntry(UNAVAILABLE, "not loaded")
                if ready_only and entry.state != READY:
                    continue
                rows.append({"name": name, "version": str(version), "state": entry.state, "reason": entry.reason})
        return rows

    async def close(self) -> None:
        """Stop every served version (the caller drained requests first). A load still running on its thread is
        abandoned: the process exits without it (``service.cli.exit_process``)."""
        await self.store.close()


def _load_alone(loader: Loader, name: str, version: int, source: VersionSource) -> ServedModel:
    """A run-time load on one intra-op thread: it never holds a second OpenMP team beside the forward passes (see
    the runner)."""
    torch.set_num_threads(1)
    return loader.load(name, version, source)


def hub_models(options: tuple[str, ...]) -> dict[str, HubRef]:
    """The ``--model`` settings by served name; a malformed one or two of one name stop start-up."""
    models: dict[str, HubRef] = {}
    for option in options:
        try:
            name, ref = parse_model_option(option)
        except ValueError as e:
            raise ModelStoreError(f"--model {option!r}: {e}") from e
        if name in models:
            raise ModelStoreError(f"--model: two models named {name!r}; name one NAME=REPO_ID")
        models[name] = ref
    return models
