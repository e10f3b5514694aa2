"""Building a served model from one version's files: load, check the weights and input channels, choose the runtime
that runs its forward pass (``--runtime``, ``service.engine.runtimes``), wire its runner, batcher and decoding, then
probe its preprocessing and warm it up. Blocking: run off the event loop."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from service.engine.batching import Batcher
from service.engine.decode_pool import DecodePool
from service.engine.runner import ModelRunner, default_forward_workers
from service.engine.runtimes import TORCH, RuntimeOptions
from service.engine.runtimes.cache import default_cache_dir
from service.engine.runtimes.selection import load_dtype, load_quantize, prepare_runtime
from service.engine.served import ServedModel
from service.engine.store_files import VersionSource
from service.errors import CheckpointError, ModelLoadFailed, ServiceError
from service.metrics import Metrics
from service.model.checkpoints import LoadedCheckpoint, resolve_device
from service.model.device_decoding import device_decoding_for
from service.model.hub import HUB_SUFFIX, HubRef, read_store_entry, resolve
from service.model.prepare import load_for_serving
from service.model.preprocessing import Preprocessor
from service.settings import Settings

log = logging.getLogger("deit_serve.store")

_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def check_weights(checkpoint: LoadedCheckpoint) -> None:
    """NaN or infinite weights make every score NaN; refuse them at load, naming the tensor and file."""
    source = checkpoint.source
    if source.is_dir():
        source = next((source / n for n in _WEIGHT_FILES if (source / n).is_file()), source)
    for name, tensor in itertools.chain(checkpoint.model.named_parameters(), checkpoint.model.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: tensor {name!r} holds NaN or infinite values")


def info_labels(served: ServedModel) -> tuple[str, ...]:
    """The ``deit_model_info`` labels after model and version: architecture, dtype, device, the hub id and commit it
    was loaded from (empty when not loaded by hub id), the runtime serving it and its precision."""
    checkpoint, origin, runtime = served.checkpoint, served.origin, served.runtime
    dtype = str(checkpoint.dtype).removeprefix("torch.")
    hub_id, revision = (origin.ref.repo_id, origin.commit) if origin else ("", "")
    return (
        checkpoint.config.architecture.value, dtype, str(checkpoint.device), hub_id, revision, runtime.name,
        runtime.precision,
    )  # fmt: skip


def version_label(name: str, version: int) -> str:
    return name if version == 1 else f"{name}/{version}"


@dataclass
class Loader:
    """Builds served models with the service's settings, metrics and decoding threads."""

    settings: Settings
    metrics: Metrics
    decode_pool: DecodePool
    threads: int  # intra-op threads of a forward pass on the CPU
    pins: dict[HubRef, str] = field(default_factory=dict)  # the commit each hub model is served at, for the process

    def load(self, name: str, version: int, source: VersionSource) -> ServedModel:
        """One version, loaded, checked and warmed up; any failure is a ModelLoadFailed naming the model and its
        files (never a store that is silently not ready)."""
        try:
            return self._build(name, version, source)
        except ServiceError as e:
            raise ModelLoadFailed(version_label(name, version), str(source.path), e.message) from e
        except Exception as e:
            raise ModelLoadFailed(
                version_label(name, version), str(source.path), f"loading failed: {type(e).__name__}: {e}"
            ) from e

    def runtime_options(self) -> RuntimeOptions:
        s = self.settings
        return RuntimeOptions(
            runtime=s.runtime,
            dtype=s.dtype,
            quantize=s.quantize,
            threads=self.threads,
            streams=s.forward_workers or 1,
            cache_dir=s.runtime_cache or default_cache_dir(),
            measure_s=s.runtime_measure_s,
            max_batch_size=s.max_batch_size,
        )

    def _build(self, name: str, version: int, source: VersionSource) -> ServedModel:
        s = self.settings
        started = time.perf_counter()
        path, snapshot = source.path, None
        ref = source.hub or (read_store_entry(path) if path.suffix == HUB_SUFFIX else None)
        if ref is not None:  # a complete snapshot at the commit this process serves, or an error naming the fix
            snapshot = resolve(ref, self.pins.get(ref))
            path = snapshot.path
        options, device = self.runtime_options(), resolve_device(s.device)
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
        check_weights(checkpoint)
        on_cpu = checkpoint.device.type == "cpu"
        metrics = self.metrics.for_version(str(version))
        preprocessor = Preprocessor(checkpoint.preprocess, jpeg_draft=s.jpeg_draft)
        runtime = prepare_runtime(checkpoint, options, preprocessor)
        # A runtime with a thread pool of its own runs one batch at a time on all the threads, not torch's two
        # single-threaded slots (runner.py): its pool splits each pass without OpenMP's second-team cost.
        workers = default_forward_workers(checkpoint.device, self.threads) if runtime.info.name == TORCH else 1
        runner = ModelRunner(
            name,
            runtime.forward,
            forward_workers=s.forward_workers or workers,
            intra_op_threads=self.threads if on_cpu else None,
        )
        batcher = Batcher(
            name,
            runner,
            max_batch_size=s.max_batch_size,
            max_batch_delay_s=s.max_batch_delay_ms / 1000,
            max_queue_size=s.max_queue_size,
            metrics=metrics,
            attributes={
                "version": str(version), "runtime": runtime.info.name, "device": str(checkpoint.device),
                "dtype": str(checkpoint.dtype).removeprefix("torch."),
            },
        )  # fmt: skip
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
            fingerprint=source.fingerprint,
            origin=snapshot,
            runtime=runtime.info,
        )
        if s.warmup:
            served.warm_up(s.max_batch_size)
        else:
            served.probe()
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
                **({"hub_id": str(snapshot.ref), "revision": snapshot.commit} if snapshot else {}),
            },
        )
        return served
