"""The model store: one directory (or ``.pth``) per model, each loaded, warmed up and given its own batcher."""

from __future__ import annotations

import functools
import io
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from service.batching import Batcher
from service.errors import CheckpointError, ModelLoadFailed, ModelNotFound, ModelStoreError, ServiceError
from service.metrics import Metrics
from service.model.checkpoints import PTH_SUFFIXES, LoadedCheckpoint, load_checkpoint
from service.model.decoding import decode_image
from service.model.preprocessing import Preprocessor
from service.settings import Settings

log = logging.getLogger("deit_serve.store")


class ModelRunner:
    """The forward pass of one model: stack, move, run. Called from the model's forward threads.

    Answers float32 logits (the average of the CLS and distillation heads) on the CPU: /classify takes their
    softmax, other protocols also return the logits themselves."""

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
            return logits.float().cpu()


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

    @property
    def preprocess_source(self) -> str:
        """Where the model's preprocessing comes from, for error messages."""
        source = self.checkpoint.source
        path = (source if source.is_dir() else source.parent) / "preprocessor_config.json"
        return str(path) if path.is_file() else f"the default preprocessing of {source}"

    def probe(self) -> Tensor:
        """Decode and preprocess a synthetic photo-like JPEG the way uploads are, so that a preprocessing config
        that cannot produce the model's input fails start-up instead of every request."""
        try:
            pixels = self.preprocessor(decode_image(PROBE_JPEG, PROBE_PIXELS, self.preprocessor.draft_size))
        except Exception as e:
            raise ModelStoreError(f"{self.preprocess_source}: preprocessing fails: {type(e).__name__}: {e}") from e
        expected = (3, *self.preprocessor.cfg.output_size)
        finite = bool(torch.isfinite(pixels).all())
        if tuple(pixels.shape) != expected or not finite:
            got = f"shape {tuple(pixels.shape)}" if finite else "NaN or infinite values"
            raise ModelStoreError(f"{self.preprocess_source}: preprocessing gave {got}, not {expected} finite values")
        return pixels

    def warm_up(self, max_batch_size: int) -> None:
        """Run the probe image through the model at the largest batch size (and size 1) on every forward thread,
        so that first requests pay no allocation or lazy initialisation, and check the scores that come out."""
        pixels = self.probe()
        sizes = sorted({1, max_batch_size})
        try:
            outputs = self.batcher.warm_up([[pixels] * n for n in sizes])
        except Exception as e:
            raise ModelStoreError(
                f"warm-up forward pass on the output of {self.preprocess_source} failed: {type(e).__name__}: {e}"
            ) from e
        classes = len(self.labels)
        for probs in outputs:
            if probs.ndim != 2 or probs.shape[1] != classes:
                raise ModelStoreError(f"warm-up gave scores of shape {tuple(probs.shape)}, not (batch, {classes})")
            if not bool(torch.isfinite(probs).all()):
                raise ModelStoreError(
                    f"warm-up forward pass gave non-finite scores (NaN or infinity) from the weights in "
                    f"{self.checkpoint.source} on the output of {self.preprocess_source}"
                )
        self.ready = True


def _probe_jpeg() -> bytes:
    """A 160×120 JPEG of smooth gradients and seeded noise: decodes through the same path as an upload."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:120, 0:160]
    base = np.stack([x * 255 / 159, y * 255 / 119, (x + y) * 255 / 278], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


PROBE_JPEG = _probe_jpeg()
PROBE_PIXELS = 160 * 120


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
        checkpoint = load_checkpoint(path, device=s.device, dtype=s.dtype)
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

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(m.ready for m in self.models.values())
