"""Several batches of one model at once: each slot on its own thread, CPU threads shared without a second team."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from service.engine.batching import Batcher
from service.engine.runner import ModelRunner, Outputs
from service.metrics import Metrics


class RecordingRunner:
    """Sums each image; records the thread and intra-op thread count of every batch, and how many overlapped."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls: list[tuple[str, int, int]] = []  # thread name, torch threads, batch size
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, pixels: Sequence[Tensor]) -> Outputs:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
            self.calls.append((threading.current_thread().name, torch.get_num_threads(), len(pixels)))
        return {"logits": torch.stack([p.sum().reshape(1) for p in pixels])}


def _batcher(runner: RecordingRunner, workers: int, threads: int | None, max_batch_size: int = 8) -> Batcher:
    return Batcher(
        "m",
        ModelRunner("m", runner, forward_workers=workers, intra_op_threads=threads),
        max_batch_size=max_batch_size,
        max_batch_delay_s=0.0,
        max_queue_size=1000,
        metrics=Metrics(max_batch_size),
    )


async def _classify(batcher: Batcher, values: Sequence[float]) -> list[float]:
    with batcher.admit(len(values)) as admission:
        items = batcher.enqueue(admission, [torch.full((2,), v) for v in values], time.monotonic() + 30)
    return [float(row["logits"].item()) for row in await asyncio.gather(*(i.future for i in items))]


@pytest.mark.asyncio
async def test_two_workers_run_two_batches_at_once_and_answer_each_image() -> None:
    runner = RecordingRunner(0.05)
    batcher = _batcher(runner, workers=2, threads=2)
    batcher.start()
    try:
        results = await asyncio.gather(*(_classify(batcher, [float(i)]) for i in range(16)))
    finally:
        await batcher.stop()
    assert [r[0] for r in results] == [2.0 * i for i in range(16)]
    assert runner.most_at_once == 2
    # Beside another batch, each takes half of max_batch_size.
    assert max(size for _, _, size in runner.calls) <= 8


@pytest.mark.asyncio
async def test_only_the_first_slot_runs_multi_threaded_and_only_alone() -> None:
    runner = RecordingRunner(0.05)
    batcher = _batcher(runner, workers=2, threads=2)
    batcher.start()
    try:
        await _classify(batcher, [1.0])  # alone: all threads, on slot 0
        await asyncio.gather(*(_classify(batcher, [float(i)]) for i in range(12)))
    finally:
        await batcher.stop()
    first_name, first_threads, _ = runner.calls[0]
    assert first_name.startswith("forward-m-0")
    assert first_threads == 2
    for name, threads, _ in runner.calls:
        assert name.startswith(("forward-m-0", "forward-m-1"))
        if not name.startswith("forward-m-0"):
            assert threads == 1


@pytest.mark.asyncio
async def test_one_worker_runs_one_batch_at_a_time() -> None:
    runner = RecordingRunner(0.02)
    batcher = _batcher(runner, workers=1, threads=None, max_batch_size=4)
    batcher.start()
    try:
        await asyncio.gather(*(_classify(batcher, [float(i)]) for i in range(10)))
    finally:
        await batcher.stop()
    assert runner.most_at_once == 1
    assert max(size for _, _, size in runner.calls) <= 4


def test_warm_up_runs_on_every_forward_thread() -> None:
    runner = RecordingRunner(0.0)
    batcher = _batcher(runner, workers=2, threads=2)
    batcher.runner.warm_up([[torch.zeros(2)], [torch.zeros(2)] * 3])
    asyncio.run(batcher.stop())
    names = sorted({name.rsplit("_", 1)[0] for name, _, _ in runner.calls})
    assert names == ["forward-m-0", "forward-m-1"]
    assert {(n.rsplit("_", 1)[0], t) for n, t, _ in runner.calls} == {("forward-m-0", 2), ("forward-m-1", 1)}


class SelfTimingForward:
    """Sums each image, measuring its own pass from inside the forward thread."""

    def __init__(self) -> None:
        self.own_seconds: list[float] = []

    def __call__(self, pixels: Sequence[Tensor]) -> Outputs:
        started = time.perf_counter()
        logits = torch.stack([p.sum().reshape(1) for p in pixels])
        self.own_seconds.append(time.perf_counter() - started)
        return {"logits": logits}


@pytest.mark.asyncio
async def test_the_forward_pass_is_timed_in_its_forward_thread() -> None:
    """The duration a batch reports (its images' ``forward_s`` and ``deit_forward_duration_seconds``) is measured
    around the pass in its thread: never less than what the pass measured of itself, however late the event loop
    wakes up to answer it (on a fast CPU the pass ends before the loop gets there)."""
    forward = SelfTimingForward()
    metrics = Metrics(8)
    runner = ModelRunner("m", forward, forward_workers=1)
    forwarded = await runner.start(0, [torch.ones(2)], more_queued=False)
    assert forwarded.seconds >= forward.own_seconds[-1]
    assert forwarded.outputs["logits"].tolist() == [[2.0]]
    batcher = Batcher("m", runner, max_batch_size=8, max_batch_delay_s=0.0, max_queue_size=100, metrics=metrics)
    batcher.start()
    try:
        with batcher.admit(1) as admission:
            (item,) = batcher.enqueue(admission, [torch.full((2,), 3.0)], time.monotonic() + 30)
        assert (await item.future)["logits"].tolist() == [6.0]
    finally:
        await batcher.stop()
    assert item.forward_s >= forward.own_seconds[-1]
    recorded = metrics.registry.get_sample_value("deit_forward_duration_seconds_sum", {"model": "m", "version": "1"})
    assert recorded == item.forward_s
