"""Forward passes timed side by side: rounds whose order rotates, so that no contestant always runs first (warm
caches) or last (a throttled CPU)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

X = TypeVar("X")


def timed(
    models: Mapping[str, Callable[[X], object]],
    x: X,
    items: int,
    rounds: int,
    round_time: float,
    *,
    same_iterations: bool = False,
) -> dict[str, tuple[float, float]]:
    """Per contestant: the median items/s (``items`` per call of ``x``), and the median per-round ratio of the first
    contestant's time to its time. Each round runs each contestant for about ``round_time`` seconds (estimated from
    one call, which is also the warm-up); with ``same_iterations`` all run the slowest's count."""
    names = list(models)

    def seconds(forward: Callable[[X], object], iters: int) -> float:
        start = time.perf_counter()
        for _ in range(iters):
            forward(x)
        return (time.perf_counter() - start) / iters

    estimates = {n: seconds(models[n], 1) for n in names}
    if same_iterations:
        estimates = dict.fromkeys(names, max(estimates.values()))
    iters = {n: max(1, round(round_time / estimates[n])) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            times[n].append(seconds(models[n], iters[n]))
    first = times[names[0]]
    return {
        n: (items / statistics.median(t), statistics.median(a / b for a, b in zip(first, t, strict=True)))
        for n, t in times.items()
    }
