"""The model store: one directory (or ``.pth``) per model, each loaded, warmed up and given its own batcher."""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import torch

from service.batching import Batcher
from service.decode_pool import DecodePool
from service.errors import CheckpointError, ModelLoadFailed, ModelNotFound, ModelStoreError, ServiceError
from service.metrics import Metrics
from service.model.checkpoints import PTH_SUFFIXES, LoadedCheckpoint
from service.model.prepare import load_for_serving
from service.model.preprocessing import Preprocessor
from service.runner import ModelRunner, checkpoint_forward, default_forward_workers
from service.served import ServedModel
from service.settings import Settings

log = logging.getLogger("deit_serve.store")


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
    if not store.is_dir():
        raise ModelStoreError(f"model store {store} is not a directory")
    found: list[tuple[str, Path]] = []
    for entry in sorted(store.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() or (entry.is_file() and entry.suffix in PTH_SUFFIXES):
            found.append((entry.stem if entry.is_file() else entry.name, entry))
    if not found:
        raise ModelStoreError(f"model store {store} holds no models (one directory or .pth per model)")
    names = [n for n, _ in found]
    if len(set(names)) != len(names):
        raise ModelStoreError(f"model store {store} has two models with the same name: {names}")
    return found


class ModelStore:
    """The loaded models by name; the first one (or ``default_model``) answers requests that name none."""

    def __init__(self, settings: Settings, metrics: Metrics, decode_pool: DecodePool) -> None:
        self.settings = settings
        self.metrics = metrics
        self.decode_pool = decode_pool
        self.models: dict[str, ServedModel] = {}
        self.default_name: str | None = settings.default_model

    def load_all(self) -> None:
        """Load every model of the store (blocking; run off the event loop)."""
        s = self.settings
        # Forward passes get their threads in their own threads (Batcher); this loading thread uses one, so that
        # it never holds a second OpenMP thread team (see Batcher).
        threads = s.torch_threads or torch.get_num_threads()
        torch.set_num_threads(1)
        entries = discover(s.model_store)
        if s.default_model is not None and s.default_model not in {n for n, _ in entries}:
            raise ModelStoreError(f"default model {s.default_model!r} is not in the store {s.model_store}")
        for name, path in entries:
            try:
                served = self._load(name, path, threads)
            except ServiceError as e:
                raise ModelLoadFailed(name, str(path), e.message) from e
            except Exception as e:  # any failure stops start-up, named: never a store that is silently not ready
                raise ModelLoadFailed(name, str(path), f"loading failed: {type(e).__name__}: {e}") from e
            self.models[name] = served
        if self.default_name is None:
            self.default_name = entries[0][0]

    def _load(self, name: str, path: Path, threads: int) -> ServedModel:
        """Load, check and warm up one model; raises on any problem, leaving the store without it."""
        s = self.settings
        started = time.perf_counter()
        checkpoint = load_for_serving(path, s)
        if not checkpoint.config.architecture.classifies:
            raise ModelStoreError(
                f"{checkpoint.config.architecture.value} has no classification head; the service serves classifiers"
            )
        if checkpoint.config.num_channels != 3:
            raise CheckpointError(
                f"{checkpoint.source}: the model takes {checkpoint.config.num_channels} input channels; "
                "the service feeds it RGB images (3)"
            )
        _check_weights(checkpoint)
        on_cpu = checkpoint.device.type == "cpu"
        runner = ModelRunner(
            name,
            checkpoint_forward(checkpoint),
            forward_workers=s.forward_workers or default_forward_workers(checkpoint.device, threads),
            intra_op_threads=threads if on_cpu else None,
        )
        batcher = Batcher(
            name,
            runner,
            max_batch_size=s.max_batch_size,
            max_batch_delay_s=s.max_batch_delay_ms / 1000,
            max_queue_size=s.max_queue_size,
            metrics=self.metrics,
        )
        served = ServedModel(
            name,
            checkpoint,
            Preprocessor(checkpoint.preprocess, jpeg_draft=s.jpeg_draft),
            batcher,
            self.decode_pool,
            self.metrics,
            s.max_image_pixels,
            load_seconds=time.perf_counter() - started,
        )
        if s.warmup:
            served.warm_up(s.max_batch_size)
        else:
            served.probe()
        served.ready = True
        self.metrics.model_info.labels(
            name, checkpoint.config.architecture.value, str(checkpoint.dtype).removeprefix("torch."),
            str(checkpoint.device),
        ).set(1)  # fmt: skip
        log.info(
            "model loaded",
            extra={
                "model": name,
                "architecture": checkpoint.config.architecture.value,
                "parameters": checkpoint.num_parameters,
                "dtype": str(checkpoint.dtype).removeprefix("torch."),
                "device": str(checkpoint.device),
                "labels": checkpoint.config.num_labels,
                "load_s": round(served.load_seconds, 3),
                "total_s": round(time.perf_counter() - started, 3),
                "source": str(path),
            },
        )
        return served

    def get(self, name: str | None) -> ServedModel:
        key = name or self.default_name
        if key is None or key not in self.models:
            known = ", ".join(sorted(self.models)) or "none loaded yet"
            raise ModelNotFound(f"model {name!r} not found; available: {known}")
        return self.models[key]
