"""What the service's pipeline can do without HTTP: decode + preprocess + batch + forward ("pipeline limit").

Everything runs through the service's own pieces, with its threads: ``decode_image`` and ``Preprocessor`` in a
thread pool, the ``Batcher`` and the ``ModelRunner`` (its forward threads and thread policy); only HTTP is missing.

* Forward only: a batch of b preprocessed images handed to the batcher at once, until its results are back.
* One image: a single JPEG decoded, preprocessed and classified while nothing else runs (the floor of a request's
  latency at concurrency 1).
* Serial: decode and preprocess b images, then classify them as one batch; nothing overlaps.
* Overlapped: closed-loop producers keep the batcher saturated while the pool decodes and preprocesses, as under
  load in the service; its best img/s over the batch sizes tried is the pipeline limit.

Ours against transformers' forward alone is ``benchmarks/model_forward.py``.

    .venv/bin/python -m benchmarks.pipeline_limit --model tiny --dtype float32,bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks import assets
from service.engine.batching import Batcher
from service.engine.runner import ModelRunner, checkpoint_forward, default_forward_workers
from service.metrics import Metrics
from service.model.checkpoints import LoadedCheckpoint, load_checkpoint
from service.model.decoding import decode_image
from service.model.preprocessing import Preprocessor
from service.settings import Settings

MAX_PIXELS = Settings.model_fields["max_image_pixels"].default
DEADLINE_S = 600.0


@dataclass
class PipelineResult:
    model: str
    dtype: str
    image_size: str
    torch_threads: int
    preprocess_threads: int
    forward_workers: int
    # batch size → img/s
    forward_img_s: dict[int, float] = field(default_factory=dict)
    max_batch_size: int = 0
    max_batch_ms: float = 0.0
    preprocess_ms: float = 0.0
    single_image_ms: float = 0.0
    serial_img_s: dict[int, float] = field(default_factory=dict)
    overlapped_img_s: dict[int, float] = field(default_factory=dict)

    @property
    def limit_img_s(self) -> float:
        return max(self.overlapped_img_s.values(), default=0.0)

    @property
    def limit_batch(self) -> int:
        return max(self.overlapped_img_s, key=lambda b: self.overlapped_img_s[b], default=0)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "limit_img_s": self.limit_img_s, "limit_batch": self.limit_batch}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PipelineResult:
        raw = {k: v for k, v in raw.items() if k not in ("limit_img_s", "limit_batch")}
        for key in ("forward_img_s", "serial_img_s", "overlapped_img_s"):
            raw[key] = {int(k): float(v) for k, v in raw[key].items()}
        return cls(**raw)


async def _median_ms(fn: Callable[[], Awaitable[object]], seconds: float) -> float:
    await fn()
    times: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 5:
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


class Pipeline:
    """The service's decode → preprocess → batch → forward path, driven without HTTP."""

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        images: Sequence[bytes],
        *,
        max_batch_size: int,
        preprocess_threads: int,
        forward_workers: int,
        intra_op_threads: int,
        jpeg_draft: bool = False,
    ) -> None:
        self.preprocessor = Preprocessor(checkpoint.preprocess, jpeg_draft=jpeg_draft)
        runner = ModelRunner(
            "bench",
            checkpoint_forward(checkpoint),
            forward_workers=forward_workers,
            intra_op_threads=intra_op_threads,
        )
        self.batcher = Batcher(
            "bench",
            runner,
            max_batch_size=max_batch_size,
            max_batch_delay_s=Settings.model_fields["max_batch_delay_ms"].default / 1000,
            max_queue_size=1 << 20,
            metrics=Metrics(max_batch_size),
        )
        self.pool = ThreadPoolExecutor(preprocess_threads, thread_name_prefix="preprocess")
        self.images = list(images)
        self._next = 0

    def image(self) -> bytes:
        self._next = (self._next + 1) % len(self.images)
        return self.images[self._next]

    def prepare(self, data: bytes) -> Tensor:
        return self.preprocessor(decode_image(data, MAX_PIXELS, self.preprocessor.draft_size))

    async def classify(self, pixels: Sequence[Tensor]) -> None:
        """Queue already preprocessed images and wait for their results."""
        with self.batcher.admit(len(pixels)) as admission:
            items = self.batcher.enqueue(admission, pixels, time.monotonic() + DEADLINE_S)
        await asyncio.gather(*(item.future for item in items))

    async def request(self) -> None:
        """One image as the service handles it: decoded in the pool, then queued."""
        loop = asyncio.get_running_loop()
        with self.batcher.admit(1) as admission:
            pixels = await loop.run_in_executor(self.pool, self.prepare, self.image())
            items = self.batcher.enqueue(admission, [pixels], time.monotonic() + DEADLINE_S)
        await items[0].future

    async def serial(self, batch: int) -> None:
        await self.classify([self.prepare(self.image()) for _ in range(batch)])

    async def overlapped(self, batch: int, seconds: float) -> float:
        """img/s with enough requests in flight to keep every forward thread busy with batches of ``batch``:
        concurrency / mean latency (Little's law) over ``seconds`` from when every producer has had an answer."""
        self.batcher.max_batch_size = batch
        concurrency = 2 * batch * self.batcher.runner.forward_workers
        latencies: list[tuple[float, float]] = []  # (answered at, latency)
        answered: set[int] = set()
        everyone_answered = asyncio.Event()
        window: list[float] = []

        async def producer(i: int) -> None:
            while not window or time.perf_counter() < window[1]:
                t0 = time.perf_counter()
                await self.request()
                t1 = time.perf_counter()
                latencies.append((t1, t1 - t0))
                answered.add(i)
                if len(answered) == concurrency:
                    everyone_answered.set()

        async def meter() -> None:
            await everyone_answered.wait()
            opens = time.perf_counter()
            window.extend([opens, opens + seconds])

        await asyncio.gather(meter(), *(producer(i) for i in range(concurrency)))
        in_window = [latency for t, latency in latencies if window[0] <= t <= window[1]]
        # A window shorter than one round of answers (a slow model) falls back to every answer after it opened.
        return concurrency / statistics.fmean(in_window or [latency for t, latency in latencies if t >= window[0]])


async def _measure(
    pipeline: Pipeline,
    result: PipelineResult,
    batch_sizes: Sequence[int],
    forward_batches: Sequence[int],
    seconds: float,
) -> None:
    pipeline.batcher.start()
    h, w = pipeline.preprocessor.cfg.output_size
    try:
        for b in forward_batches:
            pixels = list(torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(b)))
            ms = await _median_ms(lambda pixels=pixels: pipeline.classify(pixels), seconds)  # type: ignore[misc]
            result.forward_img_s[b] = b / ms * 1000
            if b == result.max_batch_size:
                result.max_batch_ms = ms
        started = time.perf_counter()
        times: list[float] = []
        while time.perf_counter() - started < seconds / 2 or len(times) < 5:
            t0 = time.perf_counter()
            pipeline.prepare(pipeline.image())
            times.append(time.perf_counter() - t0)
        result.preprocess_ms = statistics.median(times) * 1000
        result.single_image_ms = await _median_ms(pipeline.request, seconds)
        for b in batch_sizes:
            t0 = time.perf_counter()
            rounds = 0
            while time.perf_counter() - t0 < seconds or rounds == 0:
                await pipeline.serial(b)
                rounds += 1
            result.serial_img_s[b] = rounds * b / (time.perf_counter() - t0)
            await pipeline.overlapped(b, min(1.0, seconds / 2))  # warm-up at this batch size
            result.overlapped_img_s[b] = await pipeline.overlapped(b, seconds)
    finally:
        await pipeline.batcher.stop()
        pipeline.pool.shutdown()


def measure(
    model: str,
    dtype: str,
    image_size: str,
    *,
    batch_sizes: Sequence[int],
    max_batch_size: int,
    torch_threads: int,
    preprocess_threads: int,
    seconds: float,
    jpeg_draft: bool = False,
    forward_workers: int = 0,
    forward_batches: Sequence[int] | None = None,
) -> PipelineResult:
    threads = torch_threads or torch.get_num_threads()
    torch.set_num_threads(1)  # this thread: loading and inputs only; forward passes get theirs in the batcher
    checkpoint = load_checkpoint(assets.checkpoint(model), dtype=getattr(torch, dtype))
    workers = forward_workers or default_forward_workers(checkpoint.device, threads)
    result = PipelineResult(model, dtype, image_size, threads, preprocess_threads, workers)
    result.max_batch_size = max_batch_size
    pipeline = Pipeline(
        checkpoint,
        assets.photos(image_size),
        max_batch_size=max(max_batch_size, *batch_sizes),
        preprocess_threads=preprocess_threads,
        forward_workers=workers,
        intra_op_threads=threads,
        jpeg_draft=jpeg_draft,
    )
    h, w = checkpoint.preprocess.output_size
    pipeline.batcher.runner.warm_up([[torch.zeros(3, h, w)] * n for n in sorted({1, max_batch_size})])
    forward_batches = sorted(forward_batches or {1, *batch_sizes, max_batch_size})
    asyncio.run(_measure(pipeline, result, batch_sizes, forward_batches, seconds))
    return result


def report(results: Sequence[PipelineResult]) -> str:
    lines = [
        "| model | dtype | images | threads (torch/pre/forward) | forward only img/s (batch) "
        "| one batch of max size ms | one image: decode + preprocess ms | one image: decode + preprocess + forward ms "
        "| serial img/s (batch) | overlapped img/s (batch) | pipeline limit img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def per_batch(values: dict[int, float]) -> str:
        return ", ".join(f"{v:.0f} ({b})" for b, v in sorted(values.items())) or "-"

    for r in results:
        max_batch = f"{r.max_batch_ms:.1f} ({r.max_batch_size})" if r.max_batch_ms else "-"
        lines.append(
            f"| {r.model} | {r.dtype} | {r.image_size} | {r.torch_threads}/{r.preprocess_threads}/{r.forward_workers} "
            f"| {per_batch(r.forward_img_s)} | {max_batch} | {r.preprocess_ms:.2f} | {r.single_image_ms:.2f} "
            f"| {per_batch(r.serial_img_s)} | {per_batch(r.overlapped_img_s)} "
            f"| **{r.limit_img_s:.0f}** (batch {r.limit_batch}) |"
        )
    return "\n".join(lines)


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    defaults = {name: f.default for name, f in Settings.model_fields.items()}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=_csv, default=["tiny"], help="comma-separated: tiny,small,base")
    parser.add_argument("--dtype", type=_csv, default=["float32", "bfloat16"], help="comma-separated dtypes")
    parser.add_argument("--image-size", choices=sorted(assets.IMAGE_SIZES), default="640x480")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in _csv(s)], default=[8, 16, 32])
    parser.add_argument(
        "--forward-batches",
        type=lambda s: [int(x) for x in _csv(s)],
        help="batch sizes of the forward-only timing (default: 1, the batch sizes and the max batch size)",
    )
    parser.add_argument("--max-batch-size", type=int, default=defaults["max_batch_size"])
    parser.add_argument("--torch-threads", type=int, default=defaults["torch_threads"], help="0: torch default")
    parser.add_argument("--preprocess-threads", type=int, default=defaults["preprocess_threads"])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument("--forward-workers", type=int, default=defaults["forward_workers"], help="0: auto")
    parser.add_argument("--jpeg-draft", action="store_true", help="decode JPEGs with draft scaling (opt-in setting)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    for model in args.model:
        for dtype in args.dtype:
            results.append(
                measure(
                    model,
                    dtype,
                    args.image_size,
                    batch_sizes=args.batch_sizes,
                    max_batch_size=args.max_batch_size,
                    torch_threads=args.torch_threads,
                    preprocess_threads=args.preprocess_threads,
                    seconds=args.seconds,
                    jpeg_draft=args.jpeg_draft,
                    forward_workers=args.forward_workers,
                    forward_batches=args.forward_batches,
                )
            )
            print(report(results[-1:]).splitlines()[-1], flush=True)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps([r.to_json() for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
