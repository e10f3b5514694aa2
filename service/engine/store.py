"""The model store: every version of every model, each loaded, warmed up and given its own batcher; loaded,
reloaded and unloaded at run time without a restart.

A reload never leaves a request unanswered: the new version loads and warms up in a thread while the old one
serves, the store then swaps them in one step on the event loop, and the old one drains (the requests that hold
it finish, its batcher stops) before its memory is freed. A failed load keeps whatever was serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import itertools
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from service.engine.batching import Batcher
from service.engine.decode_pool import DecodePool
from service.engine.repository import Fingerprint, StoreContents, VersionSource, model_entries, scan_model, scan_store
from service.engine.runner import ModelRunner, default_forward_workers
from service.engine.runtimes import TORCH, RuntimeOptions
from service.engine.runtimes.cache import default_cache_dir
from service.engine.runtimes.selection import load_dtype, load_quantize, prepare_runtime, runtime_probes
from service.engine.served import ServedModel
from service.errors import (
    CheckpointError,
    ModelLoadFailed,
    ModelNotFound,
    ModelStoreError,
    RepositoryLoadFailed,
    ServiceError,
)
from service.metrics import Metrics
from service.model.checkpoints import LoadedCheckpoint, resolve_device
from service.model.device_decoding import device_decoding_for
from service.model.prepare import load_for_serving
from service.model.preprocessing import Preprocessor
from service.settings import Settings

log = logging.getLogger("deit_serve.store")

READY, UNAVAILABLE, LOADING = "READY", "UNAVAILABLE", "LOADING"


def _check_weights(checkpoint: LoadedCheckpoint) -> None:
    """NaN or infinite weights make every score NaN; refuse them at load, naming the tensor and file."""
    source = checkpoint.source
    if source.is_dir():
        source = next((source / n for n in _WEIGHT_FILES if (source / n).is_file()), source)
    for name, tensor in itertools.chain(checkpoint.model.named_parameters(), checkpoint.model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: tensor {name!r} holds NaN or infinite values")


_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def discover(store: Path) -> list[tuple[str, Path]]:
    """Models in the store: sub-directories and ``.pth``-like files, named by directory or file stem."""
    found = model_entries(store)
    if not found:
        raise ModelStoreError(f"model store {store} holds no models (one directory or .pth per model)")
    return found


def release_memory() -> None:
    """Collect the unloaded model's cycles and hand the freed memory back: glibc's heap, and on a GPU the blocks
    torch's caching allocator would otherwise keep for itself."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class VersionEntry:
    """What the repository index says of one version; ``fingerprint`` is that of the files last tried."""

    state: str
    reason: str = ""
    fingerprint: Fingerprint | None = None


class ModelStore:
    """The loaded versions by model; the newest loaded version of a model answers requests that name none, and the
    first model (or ``default_model``) answers requests that name no model."""

    def __init__(self, settings: Settings, metrics: Metrics, decode_pool: DecodePool) -> None:
        self.settings = settings
        self.metrics = metrics
        self.decode_pool = decode_pool
        self.versions: dict[str, dict[int, ServedModel]] = {}
        self.models: dict[str, ServedModel] = {}  # the newest loaded version of each model
        self.entries: dict[str, dict[int, VersionEntry]] = {}
        self._fingerprints: dict[ServedModel, Fingerprint] = {}  # every live version, draining ones too
        self._holds: dict[ServedModel, int] = {}
        self._released: dict[ServedModel, asyncio.Event] = {}  # set when the last request on a retiring version ends
        self._retiring: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._threads = settings.torch_threads or torch.get_num_threads()
        # One loading thread on one intra-op thread: a load never holds a second OpenMP team (see Batcher).
        self._loader = ThreadPoolExecutor(1, "model-load", initializer=torch.set_num_threads, initargs=(1,))

    @property
    def default_name(self) -> str | None:
        return self.settings.default_model or min(self.models, default=None)

    def all_served(self) -> list[ServedModel]:
        """Every loaded version, including those draining after a reload or unload."""
        return list(self._fingerprints)

    # --- start-up ----------------------------------------------------------------------------------------------

    def load_all(self) -> None:
        """Load every version of every model of the store (blocking; run off the event loop); any failure stops
        start-up, named."""
        s = self.settings
        torch.set_num_threads(1)
        entries = discover(s.model_store)
        if s.default_model is not None and s.default_model not in {n for n, _ in entries}:
            raise ModelStoreError(f"default model {s.default_model!r} is not in the store {s.model_store}")
        contents = scan_store(s.model_store)
        for name, _ in entries:
            for version, source in contents[name].items():
                self._install(self._load_named(name, version, source))

    def _load_named(self, name: str, version: int, source: VersionSource) -> tuple[ServedModel, Fingerprint]:
        try:
            return self._load(name, version, source.path), source.fingerprint
        except ServiceError as e:
            raise ModelLoadFailed(_label(name, version), str(source.path), e.message) from e
        except Exception as e:  # any failure is named: never a store that is silently not ready
            raise ModelLoadFailed(
                _label(name, version), str(source.path), f"loading failed: {type(e).__name__}: {e}"
            ) from e

    def _install(self, loaded: tuple[ServedModel, Fingerprint]) -> ServedModel | None:
        """Put a loaded version in place (one step, on the event loop after start-up); returns the one it replaces."""
        served, fp = loaded
        versions = self.versions.setdefault(served.name, {})
        old = versions.get(served.version)
        versions[served.version] = served
        self._fingerprints[served] = fp
        self.models[served.name] = versions[max(versions)]
        self.entries.setdefault(served.name, {})[served.version] = VersionEntry(READY, fingerprint=fp)
        return old

    def _runtime_options(self) -> RuntimeOptions:
        s = self.settings
        return RuntimeOptions(
            runtime=s.runtime,
            dtype=s.dtype,
            quantize=s.quantize,
            threads=self._threads,
            streams=s.forward_workers or 1,
            cache_dir=s.runtime_cache or default_cache_dir(),
            measure_s=s.runtime_measure_s,
            max_batch_size=s.max_batch_size,
        )

    def _load(self, name: str, version: int, path: Path) -> ServedModel:
        """Load, check and warm up one version; raises on any problem, leaving the store as it was."""
        s = self.settings
        started = time.perf_counter()
        options, device = self._runtime_options(), resolve_device(s.device)
        checkpoint = load_for_serving(
            path,
            device=s.device,
            dtype=load_dtype(options, device),
            quantize=load_quantize(options, device),
            cuda_graphs=s.cuda_graphs,
            max_batch_size=s.max_batch_size,
        )
        if checkpoint.config.num_channels != 3:
            raise CheckpointError(
                f"{checkpoint.source}: the model takes {checkpoint.config.num_channels} input channels; "
                "the service feeds it RGB images (3)"
            )
        _check_weights(checkpoint)
        on_cpu = checkpoint.device.type == "cpu"
        threads = self._threads
        metrics = self.metrics.for_version(str(version))
        preprocessor = Preprocessor(checkpoint.preprocess, jpeg_draft=s.jpeg_draft)
        runtime = prepare_runtime(checkpoint, options, runtime_probes(preprocessor))
        # A runtime with a thread pool of its own runs one batch at a time on all the threads, not torch's two
        # single-threaded slots (runner.py): its pool splits each pass without OpenMP's second-team cost.
        workers = default_forward_workers(checkpoint.device, threads) if runtime.info.name == TORCH else 1
        runner = ModelRunner(
            name,
            runtime.forward,
            forward_workers=s.forward_workers or workers,
            intra_op_threads=threads if on_cpu else None,
        )
        batcher = Batcher(
            name,
            runner,
            max_batch_size=s.max_batch_size,
            max_batch_delay_s=s.max_batch_delay_ms / 1000,
            max_queue_size=s.max_queue_size,
            metrics=metrics,
        )
        device_decoding = None
        if s.preprocess_device == "cuda":
            device_decoding = device_decoding_for(preprocessor, checkpoint.device, name)
        served = ServedModel(
            name,
            checkpoint,
            preprocessor,
            batcher,
            self.decode_pool,
            metrics,
            s.max_image_pixels,
            load_seconds=time.perf_counter() - started,
            version=version,
            device_decoding=device_decoding,
            runtime=runtime.info,
        )
        if s.warmup:
            served.warm_up(s.max_batch_size)
        else:
            served.probe()
        self.metrics.model_info.labels(name, str(version), *_info_labels(served)).set(1)
        log.info(
            "model loaded",
            extra={
                "model": name,
                "version": version,
                "architecture": checkpoint.config.architecture.value,
                "parameters": checkpoint.num_parameters,
                "dtype": str(checkpoint.dtype).removeprefix("torch."),
                "runtime": f"{runtime.info.name} {runtime.info.precision}",
                "runtime_reason": runtime.info.reason,
                "device": str(checkpoint.device),
                "labels": checkpoint.config.num_labels,
                "load_s": round(served.load_seconds, 3),
                "total_s": round(time.perf_counter() - started, 3),
                "source": str(path),
            },
        )
        return served

    # --- requests ----------------------------------------------------------------------------------------------

    def get(self, name: str | None, version: int | None = None) -> ServedModel:
        """The model a request names (or the default), at ``version`` (or its newest loaded one)."""
        key = name or self.default_name
        if key is None or key not in self.models:
            known = ", ".join(sorted(self.models)) or "none loaded"
            raise ModelNotFound(f"model {name or key!r} not found; available: {known}")
        if version is None:
            return self.models[key]
        served = self.versions[key].get(version)
        if served is None:
            available = ", ".join(str(v) for v in sorted(self.versions[key]))
            raise ModelNotFound(f"model {key!r} has no version {version!r} loaded; available: {available}")
        return served

    @contextlib.contextmanager
    def hold(self, served: ServedModel) -> Iterator[None]:
        """Count a request on the version it runs on: a version replaced or unloaded drains until none holds it."""
        self._holds[served] = self._holds.get(served, 0) + 1
        try:
            yield
        finally:
            self._holds[served] -= 1
            if self._holds[served] == 0 and served in self._released:
                self._released[served].set()

    # --- run time: load, reload, unload ------------------------------------------------------------------------

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
            known = name in self.versions or name in self.entries
            if not known and await asyncio.to_thread(scan_model, self.settings.model_store, name) is None:
                raise ModelNotFound(f"model {name!r} not found")
            for version in list(self.versions.get(name, {})):
                self._remove(name, version, UNAVAILABLE, "unloaded")
            for entry in self.entries.get(name, {}).values():
                entry.state, entry.reason = UNAVAILABLE, "unloaded"

    async def sync(self, contents: StoreContents) -> None:
        """Bring the store in line with the files (the poller): load what is new or changed, unload what is gone.
        A version that failed, or that was unloaded, is left alone until its files change."""
        async with self._lock:
            for name in sorted(set(self.versions) | set(self.entries)):
                if name not in contents:
                    for version in list(self.versions.get(name, {})):
                        self._remove(name, version, UNAVAILABLE, "removed from the model store")
                    self.entries.pop(name, None)
            for name, found in sorted(contents.items()):
                with contextlib.suppress(RepositoryLoadFailed):  # reported in the index and the log
                    await self._apply(name, found, retry=False)

    async def _apply(self, name: str, found: dict[int, VersionSource], *, retry: bool) -> None:
        loaded = self.versions.get(name, {})
        entries = self.entries.setdefault(name, {})
        for version in [v for v in loaded if v not in found]:
            self._remove(name, version, UNAVAILABLE, "removed from the model store")
        for version in [v for v in entries if v not in found and v not in loaded]:
            del entries[version]
        wanted = []
        for version, source in found.items():
            current = loaded.get(version)
            if current is not None and self._fingerprints.get(current) == source.fingerprint:
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
                ready = await asyncio.get_running_loop().run_in_executor(
                    self._loader, self._load_named, name, version, source
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
            ready[0].batcher.start()
            old = self._install(ready)
            if old is not None:
                self._retire(old)
        if failures:
            raise RepositoryLoadFailed("; ".join(failures))

    def _remove(self, name: str, version: int, state: str, reason: str) -> None:
        versions = self.versions[name]
        served = versions.pop(version)
        if versions:
            self.models[name] = versions[max(versions)]
        else:
            del self.versions[name], self.models[name]
        entry = self.entries.setdefault(name, {}).setdefault(version, VersionEntry(state))
        entry.state, entry.reason = state, reason
        self._retire(served)

    def _retire(self, served: ServedModel) -> None:
        task = asyncio.create_task(self._drain(served), name=f"retire-{served.name}-{served.version}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain(self, served: ServedModel) -> None:
        """Wait until no request holds the version (at most the drain timeout), stop its batcher, free it."""
        released = self._released.setdefault(served, asyncio.Event())
        if self._holds.get(served, 0) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(released.wait(), self.settings.drain_timeout_s)
        await served.batcher.stop()
        self._holds.pop(served, None)
        self._released.pop(served, None)
        self._fingerprints.pop(served, None)
        replaced = any((m.name, m.version) == (served.name, served.version) for m in self._fingerprints)
        if not replaced:  # a reload of the same version keeps its info series
            with contextlib.suppress(KeyError):
                self.metrics.model_info.remove(served.name, str(served.version), *_info_labels(served))
        log.info("model unloaded", extra={"model": served.name, "version": served.version})
        del served
        await asyncio.to_thread(release_memory)

    def index(self, contents: StoreContents, ready_only: bool = False) -> list[dict[str, str]]:
        """The repository index: every version on disk or loaded, with its state and the reason for it."""
        rows = []
        for name in sorted(set(contents) | set(self.versions)):
            versions = sorted(set(contents.get(name, {})) | set(self.versions.get(name, {})))
            for version in versions:
                entry = self.entries.get(name, {}).get(version) or VersionEntry(UNAVAILABLE, "not loaded")
                if ready_only and entry.state != READY:
                    continue
                rows.append({"name": name, "version": str(version), "state": entry.state, "reason": entry.reason})
        return rows

    async def close(self) -> None:
        """Stop every batcher (the caller drained requests first) and the loading thread."""
        for served in self.all_served():
            await served.batcher.stop()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        self._loader.shutdown(wait=False, cancel_futures=True)


def _label(name: str, version: int) -> str:
    return name if version == 1 else f"{name}/{version}"


def _info_labels(served: ServedModel) -> tuple[str, str, str, str, str]:
    checkpoint, runtime = served.checkpoint, served.runtime
    dtype = str(checkpoint.dtype).removeprefix("torch.")
    return checkpoint.config.architecture.value, dtype, str(checkpoint.device), runtime.name, runtime.precision
