"""One classification request end to end: decode in the preprocessing pool, queue, await the batch, top-k."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from service.batching import WorkItem
from service.decoding import decode_image
from service.errors import ClientGone, DeadlineExceeded, ServiceError
from service.metrics import Metrics
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
    deadline: float,
    pool: Executor,
    max_pixels: int,
    metrics: Metrics,
    disconnected: Callable[[], Awaitable[object]],
    stats: RequestStats,
) -> list[ImageResult]:
    loop = asyncio.get_running_loop()
    batcher = served.batcher
    stats.images = len(uploads)
    with batcher.admit(len(uploads)) as admission:
        jobs = [loop.run_in_executor(pool, _decode_and_preprocess, served, u, max_pixels, metrics) for u in uploads]
        try:
            pixels = await asyncio.gather(*jobs)
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        items = batcher.enqueue(admission, pixels, deadline)
    probs = await _await_items(batcher.cancel, items, deadline, disconnected)
    stats.batch_sizes = tuple(sorted({i.batch_size for i in items}))
    stats.queue_ms = max(i.queue_s for i in items) * 1000
    stats.inference_ms = max(i.forward_s for i in items) * 1000
    return _top_k(served.labels, uploads, probs, top_k)


async def _await_items(
    cancel: Callable[[Sequence[WorkItem], str], None],
    items: list[WorkItem],
    deadline: float,
    disconnected: Callable[[], Awaitable[object]],
) -> list[Tensor]:
    """Results of the request's images, or its items withdrawn from the queue on deadline / disconnect."""
    waiter: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*(i.future for i in items)))
    waiter.add_done_callback(_consume)  # its error is read below, or nobody is left to read it (task cancelled)
    watcher: asyncio.Future[Any] = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait(
            {waiter, watcher}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        watcher.cancel()
    if waiter in done:
        return list(waiter.result())
    reason = "disconnect" if watcher in done else "deadline"
    cancel(items, reason)
    waiter.cancel()
    if reason == "disconnect":
        raise ClientGone("the client disconnected before its images ran")
    raise DeadlineExceeded("the request deadline passed before its images were classified")


def _consume(task: asyncio.Future[Any]) -> None:
    with contextlib.suppress(BaseException):
        task.exception()


def _top_k(labels: list[str], uploads: Sequence[Upload], probs: list[Tensor], k: int) -> list[ImageResult]:
    stacked = torch.stack(probs)
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
