"""One served model: what every front door calls (native API, Open Inference Protocol, Hugging Face API).

One engine call, ``infer``: encoded images or preprocessed pixels and a deadline and cancel signal
(``RequestContext``) in, the forward pass's outputs (``Inference``) out; its decoding threads, limits, queue,
forward slots and metrics are bound when it is built (``service.engine.loader``).
"""

from __future__ import annotations

import asyncio
import functools
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from service.engine.batching import Batcher
from service.engine.context import RequestContext
from service.engine.decode_pool import DecodePool
from service.engine.runtimes import RuntimeInfo
from service.engine.store_files import Fingerprint
from service.errors import ClientGone, InvalidParameter, ModelStoreError, ServiceError, ShuttingDown, TaskNotSupported
from service.images import EncodedImage
from service.metrics import Metrics
from service.model.checkpoints import LoadedCheckpoint
from service.model.decoding import decode_image, load_rgb, open_image
from service.model.device_decoding import DeviceDecoding
from service.model.hub import Snapshot
from service.model.pooling import LOGITS, Pooling, default_pooling, feature_names, poolings
from service.model.preprocessing import Preprocessor
from service.tracing import span


@dataclass
class RequestStats:
    """What the request saw of batching, for its log line."""

    images: int = 0
    batch_sizes: tuple[int, ...] = ()
    queue_ms: float = 0.0
    inference_ms: float = 0.0


Inputs = Sequence[EncodedImage] | Tensor  # encoded images, or preprocessed pixels [N, 3, H, W]


@dataclass(frozen=True)
class Inference:
    """What one engine call gives, stacked ``[N, ...]`` in input order: a classifier's logits (the average of its
    heads; None for a model without one) and the final-normed token features every pooling is made from. Front
    doors turn it into their answers with the pure functions of ``service.api.results``."""

    logits: Tensor | None
    features: dict[str, Tensor]


CLASSIFY = "classify"
EMBED = "embed"


@dataclass(eq=False)
class ServedModel:
    name: str
    checkpoint: LoadedCheckpoint
    preprocessor: Preprocessor
    batcher: Batcher
    decode_pool: DecodePool
    metrics: Metrics
    max_pixels: int
    load_seconds: float = 0.0
    version: int = 1
    device_decoding: DeviceDecoding | None = None  # --preprocess-device cuda
    fingerprint: Fingerprint = ()  # of the files it was loaded from: a reload of unchanged files is skipped
    origin: Snapshot | None = None  # the hub model and commit it was loaded from, when loaded by hub id
    runtime: RuntimeInfo = field(default_factory=RuntimeInfo)  # what runs its forward pass, and why
    labels: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.labels = self.checkpoint.labels

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocessor.cfg.output_size

    @property
    def classifies(self) -> bool:
        return self.checkpoint.config.architecture.classifies

    @property
    def tasks(self) -> list[str]:
        """What this model serves: every model embeds; those with a classification head also classify."""
        return [CLASSIFY, EMBED] if self.classifies else [EMBED]

    @property
    def embedding_dim(self) -> int:
        return self.checkpoint.config.hidden_size

    @property
    def poolings(self) -> tuple[Pooling, ...]:
        """The poolings this model offers, its natural (default) one first."""
        return poolings(self.checkpoint.config)

    def pooling(self, name: str | None) -> Pooling:
        """The pooling a request names (its natural one when none), or 422 naming those the model offers."""
        if name is None:
            return default_pooling(self.checkpoint.config)
        offered = self.poolings
        if name not in offered:
            raise InvalidParameter(
                f"pooling={name!r} is not offered by model {self.name!r}; choose one of {', '.join(offered)}"
            )
        return Pooling(name)

    def check_classifies(self) -> None:
        """400 for a classification request to a model without a classification head, naming what it serves."""
        if not self.classifies:
            raise TaskNotSupported(
                f"model {self.name!r} ({self.checkpoint.config.architecture.value}) has no classification head; "
                "it serves embeddings: POST /embed"
            )

    def start(self) -> None:
        """Start answering: its batcher begins forming batches."""
        self.batcher.start()

    async def stop(self) -> None:
        """Stop its batcher (the caller drained the requests that hold it first)."""
        await self.batcher.stop()

    def abandon(self) -> None:
        """The drain ran out of time: queued images are answered 503 now; a running batch finishes."""
        self.batcher.abandon()

    def check_room(self, n_images: int) -> None:
        """Refuse at once (503) when ``n_images`` more would overflow this model's queue."""
        self.batcher.check_room(n_images)

    # --- requests ----------------------------------------------------------------------------------------------

    async def infer(self, inputs: Inputs, context: RequestContext, stats: RequestStats | None = None) -> Inference:
        """The one engine call of every front door: encoded images are decoded taking turns with other requests for
        the decoding threads, then all of them share forward passes with other requests' images (classify and
        embed alike). Ends at the context's deadline or cancel signal, in any stage; ``stats`` gets what the request
        saw of batching."""
        stats = stats if stats is not None else RequestStats()
        batcher = self.batcher
        count = len(inputs)
        stats.images = count
        with batcher.admit(count) as admission:
            if isinstance(inputs, Tensor):
                pixels = list(inputs.float().unbind(0))
            else:
                pixels = await self._decode(inputs, context)
            items = batcher.enqueue(admission, pixels, context.deadline, context.trace)
        try:
            rows = await context.run(asyncio.gather(*(i.future for i in items)))
        except ServiceError:
            if context.stopped:  # withdraw the images that have not run yet
                batcher.cancel(items, _stop_reason(context))
            raise
        stats.batch_sizes = tuple(sorted({i.batch_size for i in items}))
        stats.queue_ms = max(i.queue_s for i in items) * 1000
        stats.inference_ms = max(i.forward_s for i in items) * 1000
        stacked = {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
        logits = stacked.pop(LOGITS, None)
        return Inference(logits, stacked)

    async def _decode(self, images: Sequence[EncodedImage], context: RequestContext) -> list[Tensor]:
        jobs = self.decode_pool.submit(context, [functools.partial(self._decode_one, image) for image in images])
        try:
            with span(context.trace, "decode", images=len(images), model=self.name):
                return await context.run(asyncio.gather(*jobs))
        except BaseException:
            for job in jobs:
                job.cancel()
            if context.stopped:  # none of its images will run: those not decoded yet never start
                self.metrics.dropped.labels(self.name, _stop_reason(context)).inc(len(images))
            raise

    def _decode_one(self, image: EncodedImage) -> Tensor:
        """Decode and preprocess one image (in a decoding thread)."""
        started = time.perf_counter()
        try:
            pixels, path = self._decode_data(image.data)
        except ServiceError as e:
            e.message = f"{image.name}: {e.message}"
            raise
        self.metrics.preprocess_duration.labels(self.name).observe(time.perf_counter() - started)
        self.metrics.decoded.labels(self.name, path).inc()
        return pixels

    def _decode_data(self, data: bytes) -> tuple[Tensor, str]:
        """The model input of an upload, and where it was made: on the device when the device path takes the
        upload (checked first, as every upload is), else on the CPU."""
        opened, name = open_image(data, self.max_pixels)
        if self.device_decoding is not None:
            pixels = self.device_decoding(opened, data)
            if pixels is not None:
                return pixels, "device"
        return self.preprocessor(load_rgb(opened, name, self.preprocessor.draft_size)), "cpu"

    # --- start-up ----------------------------------------------------------------------------------------------

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
        if self.device_decoding is not None:
            on_device = self.device_decoding(open_image(PROBE_JPEG, PROBE_PIXELS)[0], PROBE_JPEG)
            if on_device is None:
                raise ModelStoreError("--preprocess-device cuda: the device's JPEG decoder failed on a baseline JPEG")
            pixels = on_device
        expected = (3, *self.input_size)
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
        expected = self._output_widths()
        for out in outputs:
            shapes = {name: tuple(values.shape) for name, values in out.items()}
            batch = next(iter(shapes.values()))[0]
            want = {name: (batch, width) for name, width in expected.items()}
            if shapes != want:
                raise ModelStoreError(f"warm-up gave outputs of shapes {shapes}, not {want}")
            if not all(bool(torch.isfinite(values).all()) for values in out.values()):
                raise ModelStoreError(
                    f"warm-up forward pass gave non-finite scores (NaN or infinity) from the weights in "
                    f"{self.checkpoint.source} on the output of {self.preprocess_source}"
                )

    def _output_widths(self) -> dict[str, int]:
        """Each output of the forward pass and its width: the logits of a classifier, the features of every one."""
        config = self.checkpoint.config
        widths = {LOGITS: len(self.labels)} if self.classifies else {}
        widths.update(dict.fromkeys(feature_names(config), config.hidden_size))
        return widths


def _stop_reason(context: RequestContext) -> str:
    if isinstance(context.error, ClientGone):
        return "disconnect"
    if isinstance(context.error, ShuttingDown):
        return "shutdown"
    return "deadline"


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
