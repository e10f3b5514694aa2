"""Dynamic batching: one queue and one batcher task per model, in front of its forward slots (service.engine.runner).

The queue admits work up front (bounded: overload is refused at once, not queued), the batcher takes up to
``max_batch_size`` live images as soon as the model is free, and waits at most ``max_batch_delay`` only while
more images of admitted requests are still being decoded. Images whose request was cancelled (deadline passed,
client gone) are removed from the queue and never take a batch slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from service.engine.runner import Forwarded, ModelRunner, Outputs
from service.errors import DeadlineExceeded, InferenceFailed, Overloaded, ServiceError, ShuttingDown, TooManyFiles
from service.metrics import Metrics

log = logging.getLogger("deit_serve.batching")


@dataclass(eq=False)
class WorkItem:
    """One image waiting for a batch; ``future`` receives its row of each of the forward pass's outputs."""

    pixels: Tensor
    deadline: float
    future: asyncio.Future[Outputs]
    enqueued: float = field(default_factory=time.monotonic)
    # Filled in when its batch runs, for the request's log line.
    batch_size: int = 0
    queue_s: float = 0.0
    forward_s: float = 0.0


@dataclass
class Admission:
    """Queue room reserved for one request; ``pending`` images are still being decoded."""

    pending: int


class Batcher:
    """Per-model queue + batcher task. All methods run on the event loop; only the forward pass leaves it."""

    def __init__(
        self,
        model_name: str,
        runner: ModelRunner,
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue_size: int,
        metrics: Metrics,
    ) -> None:
        self.model_name = model_name
        self.runner = runner
        self.max_batch_size = max_batch_size
        self._max_delay = max_batch_delay_s
        self.max_queue_size = max_queue_size
        self._metrics = metrics
        self._queue: deque[WorkItem] = deque()
        self._admitted = 0  # images admitted and not yet batched: queued + still being decoded
        self._decoding = 0  # of those, images not yet in the queue
        self._changed = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()  # batches in a forward slot, answered when they end
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # --- admission -------------------------------------------------------------------------------------------

    def check_room(self, n_images: int) -> None:
        """Refuse at once (503) when ``n_images`` more would overflow the queue."""
        if self._closed:
            raise ShuttingDown("the service is shutting down")
        if n_images > self.max_queue_size:
            raise TooManyFiles(f"{n_images} images in one request exceed the queue size {self.max_queue_size}")
        if self._admitted + n_images > self.max_queue_size:
            self._metrics.rejected.labels(self.model_name, "queue_full").inc()
            raise Overloaded(
                f"model {self.model_name!r} is at capacity ({self._admitted} images queued, "
                f"limit {self.max_queue_size}); retry shortly"
            )

    @contextlib.contextmanager
    def admit(self, n_images: int) -> Iterator[Admission]:
        """Reserve queue room for a request's images while they are decoded; refuse at once when full."""
        self.check_room(n_images)
        self._admitted += n_images
        self._decoding += n_images
        admission = Admission(n_images)
        try:
            yield admission
        finally:
            # Images never enqueued (a decode failed, the request was cancelled) give their room back.
            self._decoding -= admission.pending
            self._admitted -= admission.pending
            self._changed.set()

    def enqueue(self, admission: Admission, pixels: Sequence[Tensor], deadline: float) -> list[WorkItem]:
        """Queue decoded images of an admitted request; returns their work items."""
        if len(pixels) > admission.pending:
            raise ValueError("more images than were admitted")
        if self._closed:
            raise ShuttingDown("the service is shutting down; retry on another instance")
        loop = asyncio.get_running_loop()
        items = [WorkItem(p, deadline, loop.create_future()) for p in pixels]
        self._queue.extend(items)
        admission.pending -= len(items)
        self._decoding -= len(items)
        self._metrics.queue_depth.labels(self.model_name).set(len(self._queue))
        self._changed.set()
        return items

    def cancel(self, items: Sequence[WorkItem], reason: str) -> None:
        """Withdraw a request's images that have not run yet (deadline passed or client gone)."""
        removed = 0
        for item in items:
            if not item.future.done():
                item.future.cancel()
            with contextlib.suppress(ValueError):
                self._queue.remove(item)
                removed += 1
        self._admitted -= removed
        if removed:
            self._metrics.dropped.labels(self.model_name, reason).inc(removed)
            self._metrics.queue_depth.labels(self.model_name).set(len(self._queue))
            self._changed.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # --- the batcher task ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.model_name}")

    async def stop(self) -> None:
        """Refuse new work and stop; the caller drains accepted requests first."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._running:  # batches already in a forward thread finish and answer their requests
            await asyncio.gather(*self._running, return_exceptions=True)
        self._fail_queued(ShuttingDown("the service stopped before this image ran"))
        await self.runner.stop()

    def warm_up(self, batches: Sequence[Sequence[Tensor]]) -> list[Outputs]:
        """Run ``batches`` on every forward slot (blocking, before ``start``); returns their outputs to check."""
        return self.runner.warm_up(batches)

    def abandon(self) -> None:
        """The drain ran out of time: refuse new work and answer queued images 503 now; a running batch finishes."""
        self._closed = True
        self._fail_queued(ShuttingDown("the service is shutting down before this image could run; retry"))

    def _fail_queued(self, error: ServiceError) -> None:
        failed = 0
        while self._queue:
            item = self._queue.popleft()
            self._admitted -= 1
            if not item.future.done():
                item.future.set_exception(error)
                failed += 1
        if failed:
            self._metrics.dropped.labels(self.model_name, "shutdown").inc(failed)
        self._metrics.queue_depth.labels(self.model_name).set(0)
        self._changed.set()

    async def _loop(self) -> None:
        runner = self.runner
        while True:
            while not self._queue:
                self._changed.clear()
                await self._changed.wait()
            slot = runner.free_slot()
            if slot is None:
                await runner.wait_for_slot()
                continue
            limit = runner.batch_limit(slot, len(self._queue), self.max_batch_size)
            await self._gather_more(limit)
            batch = self._take_batch(limit)
            if batch:
                forward = runner.start(slot, [item.pixels for item in batch], more_queued=bool(self._queue))
                task = asyncio.create_task(self._answer(batch, forward), name=f"answer-{self.model_name}-{slot}")
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _gather_more(self, limit: int) -> None:
        """Wait (at most the batch delay) for images still being decoded, when that would fill the batch more."""
        if self._max_delay <= 0:
            return
        give_up = self._queue[0].enqueued + self._max_delay
        while len(self._queue) < limit and self._decoding > 0:
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _take_batch(self, limit: int) -> list[WorkItem]:
        now = time.monotonic()
        batch: list[WorkItem] = []
        expired = 0
        while self._queue and len(batch) < limit:
            item = self._queue.popleft()
            self._admitted -= 1
            if item.future.done():  # its request gave up on it
                continue
            if item.deadline <= now:
                item.future.set_exception(DeadlineExceeded("the request deadline passed while it was queued"))
                expired += 1
                continue
            batch.append(item)
        if expired:
            self._metrics.dropped.labels(self.model_name, "deadline").inc(expired)
        self._metrics.queue_depth.labels(self.model_name).set(len(self._queue))
        wait = self._metrics.queue_wait.labels(self.model_name)
        for item in batch:
            item.queue_s = now - item.enqueued
            item.batch_size = len(batch)
            wait.observe(item.queue_s)
        return batch

    async def _answer(self, batch: list[WorkItem], forward: asyncio.Future[Forwarded]) -> None:
        """Give each image of a batch its row of each output (or the batch's error) when its forward pass ends; the
        pass's duration is the one its forward thread measured."""
        try:
            forwarded = await forward
        except Exception as e:
            self._metrics.batch_failures.labels(self.model_name).inc()
            log.exception("forward pass failed", extra={"model": self.model_name, "batch_size": len(batch)})
            error = InferenceFailed(f"inference failed on a batch of {len(batch)}: {type(e).__name__}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        results, elapsed = forwarded.outputs, forwarded.seconds
        self._metrics.forward_duration.labels(self.model_name).observe(elapsed)
        self._metrics.batch_size.labels(self.model_name).observe(len(batch))
        self._metrics.images.labels(self.model_name).inc(len(batch))
        finite = _finite_rows(results, len(batch))
        if not all(finite):
            self._metrics.nonfinite_outputs.labels(self.model_name).inc(finite.count(False))
            log.error(
                "non-finite model outputs",
                extra={"model": self.model_name, "images": finite.count(False), "batch_size": len(batch)},
            )
        for i, item in enumerate(batch):
            item.forward_s = elapsed
            if item.future.done():
                continue
            if finite[i]:
                item.future.set_result({name: values[i] for name, values in results.items()})
            else:  # a NaN score would reach the client as null: a server fault, answered as one
                reason = f"model {self.model_name!r} gave non-finite outputs (NaN or infinity) for this image"
                item.future.set_exception(InferenceFailed(reason))


def _finite_rows(outputs: Outputs, batch_size: int) -> list[bool]:
    """Per image: whether every one of its outputs is finite."""
    finite = torch.ones(batch_size, dtype=torch.bool)
    for values in outputs.values():
        finite &= torch.isfinite(values.reshape(batch_size, -1)).all(dim=1)
    result: list[bool] = finite.tolist()
    return result
