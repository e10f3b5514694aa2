"""One classification request end to end: decode in the shared decoding threads, queue, await the batch, top-k."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from service.decode_pool import DecodePool
from service.errors import ClientGone, ServiceError, ShuttingDown
from service.metrics import Metrics
from service.model.decoding import decode_image
from service.request_context import RequestContext
from service.schemas import ImageResult, Prediction
from service.store import ServedModel
from service.uploads import Upload


@dataclass
class RequestStats:
    """What the request saw of batching, for its log line."""

    images: int = 0
    batch_sizes: tuple[int, ...] = ()
    queue_ms: float = 0.0
    inference_ms: float = 0.0


def _decode_and_preprocess(served: ServedModel, upload: Upload, max_pixels: int, metrics: Metrics) -> Tensor:
    started = time.perf_counter()
    try:
        pixels = served.preprocessor(decode_image(upload.data, max_pixels, served.preprocessor.draft_size))
    except ServiceError as e:
        e.message = f"{upload.filename}: {e.message}"
        raise
    metrics.preprocess_duration.labels(served.name).observe(time.perf_counter() - started)
    return pixels


async def classify(
    served: ServedModel,
    uploads: Sequence[Upload],
    *,
    top_k: int,
    context: RequestContext,
    pool: DecodePool,
    max_pixels: int,
    metrics: Metrics,
    stats: RequestStats,
) -> list[ImageResult]:
    """Decode the uploads (taking turns with other requests for the decoding threads), queue them for a batch and
    wait for their probabilities, all under the request's deadline and cancel signal."""
    batcher = served.batcher
    stats.images = len(uploads)
    with batcher.admit(len(uploads)) as admission:
        jobs = pool.submit(
            context, [functools.partial(_decode_and_preprocess, served, u, max_pixels, metrics) for u in uploads]
        )
        try:
            pixels = await context.run(asyncio.gather(*jobs))
        except BaseException:
            for job in jobs:
                job.cancel()
            if context.stopped:  # none of its images will run: those not decoded yet never start
                metrics.dropped.labels(served.name, _stop_reason(context)).inc(len(uploads))
            raise
        items = batcher.enqueue(admission, pixels, context.deadline)
    try:
        probs = await context.run(asyncio.gather(*(i.future for i in items)))
    except ServiceError:
        if context.stopped:  # withdraw the images that have not run yet
            batcher.cancel(items, _stop_reason(context))
        raise
    stats.batch_sizes = tuple(sorted({i.batch_size for i in items}))
    stats.queue_ms = max(i.queue_s for i in items) * 1000
    stats.inference_ms = max(i.forward_s for i in items) * 1000
    return _top_k(served.labels, uploads, probs, top_k)


def _stop_reason(context: RequestContext) -> str:
    if isinstance(context.error, ClientGone):
        return "disconnect"
    if isinstance(context.error, ShuttingDown):
        return "shutdown"
    return "deadline"


def _top_k(labels: list[str], uploads: Sequence[Upload], probs: list[Tensor], k: int) -> list[ImageResult]:
    stacked = torch.softmax(torch.stack(probs), dim=-1)  # the batcher answers logits
    scores, indices = stacked.topk(min(k, stacked.shape[-1]), dim=-1)
    return [
        ImageResult(
            filename=upload.filename,
            predictions=[
                Prediction(label=labels[i], index=i, score=s)
                for s, i in zip(row_scores.tolist(), row_indices.tolist(), strict=True)
            ],
        )
        for upload, row_scores, row_indices in zip(uploads, scores, indices, strict=True)
    ]
