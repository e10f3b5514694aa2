"""The model repository: what each version on disk is to the service (READY, LOADING, UNAVAILABLE and why), the
index clients read, and bringing the registry in line with the files: load at start-up, load/reload/unload on
request, and reconcile with the poller's view of the store. A failed load keeps whatever was serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from service.engine.decode_pool import DecodePool
from service.engine.loader import Loader
from service.engine.served import ServedModel
from service.engine.store import ModelStore
from service.engine.store_files import Fingerprint, StoreContents, VersionSource, scan_model, scan_store
from service.errors import ModelLoadFailed, ModelNotFound, ModelStoreError, RepositoryLoadFailed
from service.metrics import Metrics
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
        self._lock = asyncio.Lock()
        # One loading thread on one intra-op thread: a load never holds a second OpenMP team (see the runner).
        self._loading = ThreadPoolExecutor(1, "model-load", initializer=torch.set_num_threads, initargs=(1,))

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
        contents = scan_store(s.model_store)
        if not contents:
            raise ModelStoreError(f"model store {s.model_store} holds no models (one directory or .pth per model)")
        if s.default_model is not None and s.default_model not in contents:
            raise ModelStoreError(f"default model {s.default_model!r} is not in the store {s.model_store}")
        for name, versions in contents.items():
            for version, source in versions.items():
                self._installed(self.loader.load(name, version, source))

    def _installed(self, served: ServedModel) -> None:
        self.store.install(served)
        self.entries.setdefault(served.name, {})[served.version] = VersionEntry(READY, fingerprint=served.fingerprint)

    # --- run time: load, reload, unload, reconcile -------------------------------------------------------------

    async def load(self, name: str) -> None:
        """Load (or reload) the model ``name`` from disk: new and changed versions load, removed ones unload, the
        unchanged ones keep serving. Raises ModelNotFound when the store holds no such model, and
        RepositoryLoadFailed (after applying the versions that did load) when one failed."""
        async with self._lock:
            found = await asyncio.to_thread(scan_model, self.settings.model_store, name)
            if found is None:
                raise ModelNotFound(f"the model store holds no model {name!r}")
            await self._apply(name, found, retry=True)

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
                served = await asyncio.get_running_loop().run_in_executor(
                    self._loading, self.loader.load, name, version, source
                )
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

    def _remove(self, name: str, version: int, reason: str) -> None:
        self.store.remove(name, version)
        entry = self.entries.setdefault(name, {}).setdefault(version, VersionEntry(UNAVAILABLE))
        entry.state, entry.reason = UNAVAILABLE, reason

    # --- the index ---------------------------------------------------------------------------------------------

    async def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """The repository index: every version on disk or loaded, with its state and the reason for it."""
        contents = await asyncio.to_thread(scan_store, self.settings.model_store)
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
        """Stop every served version (the caller drained requests first) and the loading thread."""
        await self.store.close()
        self._loading.shutdown(wait=False, cancel_futures=True)
