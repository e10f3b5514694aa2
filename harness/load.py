"""Closed-loop load on ``/classify``: status counts, latency of accepted requests, the top-1 each input got, and
the server's RSS sampled from ``/proc``. The load test benchmark prints it; overload tests assert on it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import ssl
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image


def sample_images(count: int, size: int = 64) -> list[bytes]:
    """Seeded random-pixel PNGs: distinct inputs, so each has its own prediction to check."""
    images = []
    for seed in range(count):
        pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        images.append(buf.getvalue())
    return images


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0…100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from ``VmRSS`` in ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class LoadReport:
    """What a run saw. ``status`` 0 counts transport errors (named in ``errors``)."""

    elapsed_s: float
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_codes: Counter[str] = field(default_factory=Counter)
    ok_latencies_s: list[float] = field(default_factory=list)
    images_ok: int = 0
    # Per input image: the top-1 labels seen, and the lowest and highest top-1 score.
    top1: dict[int, Counter[str]] = field(default_factory=dict)
    top1_score_range: dict[int, tuple[float, float]] = field(default_factory=dict)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images_ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def peak_rss_bytes(self) -> int | None:
        return max((rss for _, rss in self.rss_samples), default=None)

    def inconsistent_images(self, tolerance: float = 1e-4) -> list[int]:
        """Inputs answered with more than one top-1 label, or top-1 scores further apart than ``tolerance``."""
        spread = {i for i, (low, high) in self.top1_score_range.items() if high - low > tolerance}
        return sorted(spread | {i for i, seen in self.top1.items() if len(seen) > 1})

    def summary(self) -> dict[str, Any]:
        peak = self.peak_rss_bytes
        return {
            "elapsed_s": round(self.elapsed_s, 3),
            "requests": sum(self.statuses.values()),
            "images_ok": self.images_ok,
            "images_per_s": round(self.images_per_s, 2),
            "p50_ms": round(percentile(self.ok_latencies_s, 50) * 1000, 2),
            "p99_ms": round(percentile(self.ok_latencies_s, 99) * 1000, 2),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "error_codes": dict(sorted(self.error_codes.items())),
            "transport_errors": dict(sorted(self.errors.items())),
            "peak_rss_mib": round(peak / 2**20, 1) if peak is not None else None,
            "inconsistent_images": self.inconsistent_images(),
        }


async def _sample_rss(pid: int, report: LoadReport, started: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError, RuntimeError):
            report.rss_samples.append((time.monotonic() - started, rss_bytes(pid)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def run_load(
    url: str,
    images: Sequence[bytes],
    *,
    concurrency: int,
    duration_s: float,
    images_per_request: int = 1,
    model: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
    backoff_s: float = 0.0,
    server_pid: int | None = None,
) -> LoadReport:
    """``concurrency`` closed-loop clients for ``duration_s`` seconds; requests in flight at the end are awaited."""
    report = LoadReport(elapsed_s=0.0)
    params = {"top_k": "1", **({"model": model} if model else {})}
    # One TLS context for all clients, as building one per client is slow; built before the clock starts, since
    # loading the CA certificates can take longer than a short run.
    tls = ssl.create_default_context()
    started = time.monotonic()
    end = started + duration_s
    stop = asyncio.Event()

    async def client(worker: int) -> None:
        async with httpx.AsyncClient(transport=transport(), timeout=timeout_s, headers=dict(headers or {})) as http:
            await requests(worker, http)

    async def requests(worker: int, http: httpx.AsyncClient) -> None:
        sent = 0
        while time.monotonic() < end:
            first = (worker + sent * concurrency) * images_per_request
            chosen = [(first + j) % len(images) for j in range(images_per_request)]
            files = [("file", (f"{i}.png", images[i], "image/png")) for i in chosen]
            sent += 1
            t0 = time.monotonic()
            try:
                response = await http.post(f"{url}/classify", params=params, files=files)
            except httpx.HTTPError as e:
                report.statuses[0] += 1
                report.errors[type(e).__name__] += 1
                continue
            latency = time.monotonic() - t0
            report.statuses[response.status_code] += 1
            if response.status_code == 200:
                report.ok_latencies_s.append(latency)
                results = response.json()["results"]
                report.images_ok += len(results)
                for i, result in zip(chosen, results, strict=True):
                    best = result["predictions"][0]
                    report.top1.setdefault(i, Counter())[best["label"]] += 1
                    low, high = report.top1_score_range.get(i, (best["score"], best["score"]))
                    report.top1_score_range[i] = (min(low, best["score"]), max(high, best["score"]))
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                report.error_codes[response.json()["error"]["code"]] += 1
            if response.status_code == 503 and backoff_s > 0:
                await asyncio.sleep(backoff_s)

    # One client (one connection) per worker: a pool shared by many workers costs more client CPU than the server
    # spends on a request.

    def transport() -> httpx.AsyncHTTPTransport:
        return httpx.AsyncHTTPTransport(verify=tls, limits=httpx.Limits(max_connections=1))

    sampler = asyncio.create_task(_sample_rss(server_pid, report, started, stop)) if server_pid is not None else None
    try:
        await asyncio.gather(*(client(w) for w in range(concurrency)))
    finally:
        report.elapsed_s = time.monotonic() - started
        stop.set()
        if sampler is not None:
            await sampler
    return report
