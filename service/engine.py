"""The way other wire protocols reach the engine: the same admission, queue, batcher and deadline as /classify.

Protocol adapters (service/protocols) read and parse their own bodies, then call ``run_images`` (encoded images)
or ``run_pixels`` (already-preprocessed pixels) inside ``accepting``; both answer the model's logits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence

import torch
from fastapi import Request
from torch import Tensor

from service.batching import WorkItem
from service.inference import RequestStats, _await_items, _decode_and_preprocess
from service.state import AppState
from service.store import ServedModel
from service.uploads import Upload, _limited


@contextlib.contextmanager
def accepting(state: AppState, served: ServedModel) -> Iterator[None]:
    """Refuse at once (draining, loading, queue full) before the body is read; count the request as in flight."""
    state.lifecycle.check_accepting()
    served.batcher.check_room(1)
    with state.lifecycle.request():
        yield


def request_deadline(
    state: AppState, started: float, header_timeout_s: float | None, protocol_timeout_s: float | None = None
) -> float:
    """The request's monotonic deadline, from ``started`` (before its body was read): the shortest of the default
    (or X-Request-Timeout) and the protocol's own timeout, capped by the server."""
    settings = state.settings
    timeout = min(header_timeout_s or settings.request_timeout_s, settings.max_request_timeout_s)
    if protocol_timeout_s is not None:
        timeout = min(timeout, protocol_timeout_s)
    return started + timeout


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused (413) as soon as it passes ``max_bytes``."""
    body = bytearray()
    async for chunk in _limited(request, max_bytes):
        body.extend(chunk)
    return bytes(body)


async def run_images(
    state: AppState, served: ServedModel, images: Sequence[bytes], *, deadline: float, request: Request
) -> Tensor:
    """Logits ``[N, num_labels]`` of encoded images: decoded in the preprocessing pool, then batched."""
    loop = asyncio.get_running_loop()
    batcher = served.batcher
    stats = _stats(request, len(images))
    uploads = [Upload(f"image {i}", data) for i, data in enumerate(images)]
    with batcher.admit(len(uploads)) as admission:
        jobs = [
            loop.run_in_executor(
                state.preprocess_pool, _decode_and_preprocess, served, u, state.settings.max_image_pixels, state.metrics
            )
            for u in uploads
        ]
        try:
            pixels = await asyncio.gather(*jobs)
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        items = batcher.enqueue(admission, pixels, deadline)
    return await _results(served, items, deadline, request, stats)


async def run_pixels(
    state: AppState, served: ServedModel, pixels: Tensor, *, deadline: float, request: Request
) -> Tensor:
    """Logits ``[N, num_labels]`` of preprocessed pixels ``[N, 3, H, W]`` (no decoding), batched like images."""
    batcher = served.batcher
    stats = _stats(request, pixels.shape[0])
    with batcher.admit(pixels.shape[0]) as admission:
        items = batcher.enqueue(admission, list(pixels.float().unbind(0)), deadline)
    return await _results(served, items, deadline, request, stats)


def _stats(request: Request, images: int) -> RequestStats:
    stats = RequestStats(images=images)
    request.state.stats = stats
    return stats


async def _results(
    served: ServedModel, items: list[WorkItem], deadline: float, request: Request, stats: RequestStats
) -> Tensor:
    rows = await _await_items(served.batcher.cancel, items, deadline, lambda: _wait_for_disconnect(request))
    stats.batch_sizes = tuple(sorted({i.batch_size for i in items}))
    stats.queue_ms = max(i.queue_s for i in items) * 1000
    stats.inference_ms = max(i.forward_s for i in items) * 1000
    return torch.stack(rows)


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (after the body was read, the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
