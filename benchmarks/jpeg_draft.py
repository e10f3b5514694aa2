"""What the opt-in ``jpeg_draft`` setting costs in fidelity and saves in time, on the benchmark photos.

For each photo size: decode + preprocess time per image with the exact path and with JPEG draft decoding, the
difference of the model inputs (in normalized units: 1/255 of intensity ≈ 0.017), and of the outputs of a
random-weight DeiT (probabilities, and whether the top-1 / top-5 classes stay the same). Random weights make the
classes meaningless; what the comparison shows is how much the input change moves the model's output.

    .venv/bin/python -m benchmarks.jpeg_draft --model tiny
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from benchmarks import assets
from service.model.checkpoints import load_checkpoint
from service.model.decoding import decode_image
from service.model.preprocessing import Preprocessor
from service.settings import Settings

MAX_PIXELS = Settings.model_fields["max_image_pixels"].default


def no_sync() -> None:
    pass


def median_ms(
    fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.thread_time,
    sync: Callable[[], None] = no_sync,
) -> float:  # fmt: skip
    """Median milliseconds of ``fn`` after one call to warm up; ``clock`` defaults to this thread's CPU time (steady
    on a shared machine); ``sync`` waits for work ``fn`` queued elsewhere (a GPU) before each reading."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return statistics.median(times) * 1000


def output_agreement(model: torch.nn.Module, a: Tensor, b: Tensor) -> tuple[float, int, int]:
    """How far the model's answers to inputs ``a`` and ``b`` (one row per image) are apart: the largest probability
    difference, and on how many images the top-1 class and the top-5 set are the same."""
    with torch.inference_mode():
        pa, pb = torch.softmax(model(a), -1), torch.softmax(model(b), -1)
    top1 = int((pa.argmax(-1) == pb.argmax(-1)).sum().item())
    top5 = sum(set(x.tolist()) == set(y.tolist()) for x, y in zip(pa.topk(5).indices, pb.topk(5).indices, strict=True))
    return (pa - pb).abs().max().item(), top1, top5


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", choices=sorted(assets.VARIANTS), default="tiny")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    checkpoint = load_checkpoint(assets.checkpoint(args.model), dtype="float32")
    exact = Preprocessor(checkpoint.preprocess)
    draft = Preprocessor(checkpoint.preprocess, jpeg_draft=True)
    print(
        "| photos | decode + preprocess ms, exact | with draft | speed-up | input mean abs Δ | input max abs Δ "
        "| output max abs Δ prob | top-1 same | top-5 same |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for size in assets.IMAGE_SIZES:
        photos = assets.photos(size)
        exact_ms = statistics.median(
            median_ms(lambda data=data: exact(decode_image(data, MAX_PIXELS)), args.repeats)  # type: ignore[misc]
            for data in photos
        )
        draft_ms = statistics.median(
            median_ms(lambda data=data: draft(decode_image(data, MAX_PIXELS, draft.draft_size)), args.repeats)  # type: ignore[misc]
            for data in photos
        )
        a = torch.stack([exact(decode_image(data, MAX_PIXELS)) for data in photos])
        b = torch.stack([draft(decode_image(data, MAX_PIXELS, draft.draft_size)) for data in photos])
        max_dp, top1, top5 = output_agreement(checkpoint.model, a, b)
        n = len(photos)
        print(
            f"| {n} × {size} | {exact_ms:.2f} | {draft_ms:.2f} | {exact_ms / draft_ms:.1f}× "
            f"| {(a - b).abs().mean().item():.4f} | {(a - b).abs().max().item():.3f} "
            f"| {max_dp:.1e} | {top1}/{n} | {top5}/{n} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
