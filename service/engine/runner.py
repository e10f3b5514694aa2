"""The forward passes of one model: its forward slots and their threads, warm-up, and the out-of-memory retry.

Up to ``forward_workers`` batches run at once, batch i on forward thread i (one thread per slot). On CPU
(``intra_op_threads`` set), only slot 0 ever splits a forward pass over several threads: all of them when it runs
alone, all but one per other running batch otherwise; other slots run single-threaded. On two cores, two
single-threaded passes side by side beat one pass split in two. And OpenMP spin-waits only while it manages no more
threads than there are cores: a second thread team, even once, would slow every later forward pass down.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from service.model.checkpoints import LoadedCheckpoint
from service.model.cuda_graphs import GraphedModel
from service.model.cuda_streams import on_thread_stream
from service.model.pooling import serving_outputs

log = logging.getLogger("deit_serve.runner")

Outputs = dict[str, Tensor]  # per output name (logits, token features), one row per image of the batch
Forward = Callable[[Sequence[Tensor]], Outputs]


@dataclass(frozen=True)
class Forwarded:
    """A batch's outputs and its forward pass's duration, timed in the forward thread where the pass ran (the event
    loop may wake up long after a fast pass has ended)."""

    outputs: Outputs
    seconds: float


def checkpoint_forward(checkpoint: LoadedCheckpoint) -> Forward:
    """Stack, move, run: float32 outputs on the CPU, the logits (the average of the CLS and distillation heads) of
    a classifier and the token features its embeddings are pooled from (``serving_outputs``), from one pass."""
    device, dtype = checkpoint.device, checkpoint.dtype
    if device.type == "cuda":
        return _cuda_forward(checkpoint)
    run = model_outputs(checkpoint)

    def forward(pixels: Sequence[Tensor]) -> Outputs:
        batch = torch.stack(list(pixels)).to(dtype)
        with torch.inference_mode():
            outputs = run(batch)
            return {name: value.float() for name, value in outputs.items()}

    return forward


def model_outputs(checkpoint: LoadedCheckpoint) -> Callable[[Tensor], Outputs]:
    """The serving outputs of a batch: replayed from CUDA graphs when the model was captured, else eagerly."""
    model: object = checkpoint.model
    if isinstance(model, GraphedModel):
        return model.outputs
    return functools.partial(serving_outputs, checkpoint.model)


def _cuda_forward(checkpoint: LoadedCheckpoint) -> Forward:
    """The forward pass on CUDA, on its forward thread's own stream: the batch is stacked into pinned memory and
    copied without blocking, the outputs copied back the same way, and only the end of the stream is waited for.
    With two forward slots (the default on CUDA), the copy of one batch runs while the other's forward pass does.
    Inputs already on the device (``--preprocess-device cuda``) are stacked there."""
    device, dtype = checkpoint.device, checkpoint.dtype
    run = model_outputs(checkpoint)

    def forward(pixels: Sequence[Tensor]) -> Outputs:
        with on_thread_stream(device) as stream, torch.inference_mode():
            assert stream is not None
            batch = stack_on_device(pixels, device, stream).to(dtype)
            outputs = run(batch)
            host = {}
            for name, value in outputs.items():
                host[name] = torch.empty(value.shape, dtype=torch.float32, pin_memory=True)
                host[name].copy_(value.float(), non_blocking=True)
            stream.synchronize()
        return host

    return forward


def stack_on_device(pixels: Sequence[Tensor], device: torch.device, stream: torch.cuda.Stream) -> Tensor:
    """One float32 batch on ``device`` from images on the CPU (through pinned memory, without blocking) or on the
    device already (made on another thread's stream: ``record_stream`` keeps their memory until this one is done)."""
    on_device = [p for p in pixels if p.device.type == "cuda"]
    for p in on_device:
        p.record_stream(stream)
    if not on_device:
        host = torch.empty((len(pixels), *pixels[0].shape), dtype=torch.float32, pin_memory=True)
        torch.stack(list(pixels), out=host)
        return host.to(device, non_blocking=True)
    moved = [p if p.device.type == "cuda" else p.pin_memory().to(device, non_blocking=True) for p in pixels]
    return torch.stack(moved)


def default_forward_workers(device: torch.device, threads: int) -> int:
    """Two batches at once: on a two-thread CPU, one per core; on CUDA, so that one batch's copies and stacking
    overlap the other's forward pass. Otherwise one batch on all threads."""
    if device.type == "cuda":
        return 2
    return 2 if device.type == "cpu" and threads == 2 else 1


class ModelRunner:
    """Forward slots of one model. Slots are claimed and freed on the event loop; passes run in their threads."""

    def __init__(
        self, model_name: str, forward: Forward, *, forward_workers: int = 1, intra_op_threads: int | None = None
    ) -> None:
        self.model_name = model_name
        self.forward = forward
        self.forward_workers = forward_workers
        self._threads = intra_op_threads
        self._executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{model_name}-{i}")
            for i in range(forward_workers)
        ]
        self._running: list[asyncio.Future[Forwarded] | None] = [None] * forward_workers

    def free_slot(self) -> int | None:
        return next((i for i, running in enumerate(self._running) if running is None), None)

    async def wait_for_slot(self) -> None:
        running = [f for f in self._running if f is not None]
        if running:
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)

    def batch_limit(self, slot: int, queued: int, max_batch_size: int) -> int:
        """A batch takes its share of ``max_batch_size`` when it will run beside others (others are running, or
        more images are queued than one share), so that the batches in flight are of similar sizes."""
        share = max(1, max_batch_size // self.forward_workers)
        if self._others_running(slot) or queued > share:
            return share
        return max_batch_size

    def start(self, slot: int, pixels: Sequence[Tensor], *, more_queued: bool) -> asyncio.Future[Forwarded]:
        """Run one batch on ``slot`` (claimed at once, freed when it ends); its future holds the outputs and the
        pass's duration."""
        threads = self._threads_for(slot, more_queued)
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(self._executors[slot], self._timed_forward, pixels, threads)
        self._running[slot] = running
        running.add_done_callback(lambda _: self._free(slot))
        return running

    def _free(self, slot: int) -> None:
        self._running[slot] = None

    def _others_running(self, slot: int) -> bool:
        return any(running is not None for i, running in enumerate(self._running) if i != slot)

    def _threads_for(self, slot: int, more_queued: bool) -> int | None:
        """Slot 0: all intra-op threads when its batch runs alone with nothing queued behind it, else one fewer
        per other slot. Other slots: one."""
        if self._threads is None:
            return None
        if slot != 0:
            return 1
        if not self._others_running(slot) and not more_queued:
            return self._threads
        return max(1, self._threads - (self.forward_workers - 1))

    def warm_up(self, batches: Sequence[Sequence[Tensor]]) -> list[Outputs]:
        """Run ``batches`` on every forward thread (blocking), so that first requests pay no lazy initialisation;
        returns their outputs, for the caller to check."""
        outputs = []
        for slot, executor in enumerate(self._executors):
            threads = self._threads if slot == 0 else (None if self._threads is None else 1)
            for pixels in batches:
                outputs.append(executor.submit(self._forward_with_oom_retry, pixels, threads).result())
        return outputs

    async def stop(self) -> None:
        """Let the batches already in a forward thread finish, then end the threads."""
        running = [f for f in self._running if f is not None]
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        for executor in self._executors:
            executor.shutdown(wait=True)

    def _timed_forward(self, pixels: Sequence[Tensor], threads: int | None) -> Forwarded:
        """The batch's forward pass (in its forward thread), timed from its first to its last operation there."""
        started = time.perf_counter()
        outputs = self._forward_with_oom_retry(pixels, threads)
        return Forwarded(outputs, time.perf_counter() - started)

    def _forward_with_oom_retry(self, pixels: Sequence[Tensor], threads: int | None = None) -> Outputs:
        """Run the batch (on ``threads`` intra-op threads: set for this thread only); on out-of-memory, retry once
        as two half batches."""
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            return self.forward(pixels)
        except torch.OutOfMemoryError:
            if len(pixels) == 1:
                raise
            log.warning("out of memory on a batch of %d; retrying as two halves", len(pixels))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(pixels) // 2
            first, second = self.forward(pixels[:half]), self.forward(pixels[half:])
            return {name: torch.cat([first[name], second[name]]) for name in first}
