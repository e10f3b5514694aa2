"""The model store: one directory (or ``.pth``) per model, each loaded, warmed up and given its own batcher."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from service.batching import Batcher
from service.checkpoints import PTH_SUFFIXES, LoadedCheckpoint
from service.errors import CheckpointError, ModelNotFound, ModelStoreError
from service.metrics import Metrics
from service.prepare import load_for_serving
from service.preprocessing import Preprocessor
from service.settings import Settings

log = logging.getLogger("deit_serve.store")


class ModelRunner:
    """The forward pass of one model: stack, move, run, softmax. Called from the model's forward threads."""

    def __init__(self, checkpoint: LoadedCheckpoint) -> None:
        self.model = checkpoint.model
        self.device = checkpoint.device
        self.dtype = checkpoint.dtype
        self._pin = self.device.type == "cuda"

    def __call__(self, pixels: Sequence[Tensor]) -> Tensor:
        batch = torch.stack(list(pixels))
        if self._pin:
            batch = batch.pin_memory()
        batch = batch.to(self.device, dtype=self.dtype, non_blocking=True)
        with torch.inference_mode():
            logits = self.model(batch)
            return torch.softmax(logits.float(), dim=-1).cpu()


def default_forward_workers(device: torch.device, threads: int) -> int:
    """Two batches at once, one per core, on a two-thread CPU; otherwise one batch on all threads (see Batcher)."""
    return 2 if device.type == "cpu" and threads == 2 else 1


@dataclass
class ServedModel:
    name: str
    checkpoint: LoadedCheckpoint
    preprocessor: Preprocessor
    runner: ModelRunner
    batcher: Batcher
    load_seconds: float
    ready: bool = False

    @functools.cached_property
    def labels(self) -> list[str]:
        return self.checkpoint.labels

    def warm_up(self, max_batch_size: int) -> None:
        """Run a dummy batch at the largest size (and size 1) on every forward thread, so that first requests pay
        no allocation or lazy initialisation."""
        h, w = self.preprocessor.cfg.output_size
        self.batcher.warm_up([[torch.zeros(3, h, w)] * n for n in sorted({1, max_batch_size})])
        self.ready = True


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

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
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
            started = time.perf_counter()
            try:
                checkpoint = load_for_serving(path, s)
            except CheckpointError as e:
                raise ModelStoreError(f"model {name!r}: {e.message}") from e
            if not checkpoint.config.architecture.classifies:
                raise ModelStoreError(
                    f"model {name!r}: {checkpoint.config.architecture.value} has no classification head; "
                    "the service serves classifiers"
                )
            runner = ModelRunner(checkpoint)
            on_cpu = checkpoint.device.type == "cpu"
            batcher = Batcher(
                name,
                runner,
                max_batch_size=s.max_batch_size,
                max_batch_delay_s=s.max_batch_delay_ms / 1000,
                max_queue_size=s.max_queue_size,
                metrics=self.metrics,
                forward_workers=s.forward_workers or default_forward_workers(checkpoint.device, threads),
                intra_op_threads=threads if on_cpu else None,
            )
            served = ServedModel(
                name,
                checkpoint,
                Preprocessor(checkpoint.preprocess, jpeg_draft=s.jpeg_draft),
                runner,
                batcher,
                time.perf_counter() - started,
            )
            if s.warmup:
                served.warm_up(s.max_batch_size)
            served.ready = True
            self.models[name] = served
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
        if self.default_name is None:
            self.default_name = entries[0][0]

    def get(self, name: str | None) -> ServedModel:
        key = name or self.default_name
        if key is None or key not in self.models:
            known = ", ".join(sorted(self.models)) or "none loaded yet"
            raise ModelNotFound(f"model {name!r} not found; available: {known}")
        return self.models[key]

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(m.ready for m in self.models.values())
