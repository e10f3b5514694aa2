"""Closed-loop load against deit-serve: img/s, latency of accepted requests, status counts, the server's peak RSS.

Each of ``--concurrency`` clients sends a request, waits for the answer, and sends the next, for ``--duration``
seconds. Against a running server (``--url``), or one this script starts on a free port (``--model-store``, with
``--set name=value`` for any ``DEIT_*`` setting), whose RSS it then samples from ``/proc``:

    .venv/bin/python benchmarks/load_test.py --model-store service/data/model_store --concurrency 64 --duration 10 \\
        --set max_queue_size=16 --set max_batch_size=8
    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:8000 --concurrency 16 --duration 30 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
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
    # spends on a request. One TLS context for all, as building one per client is slow.
    tls = ssl.create_default_context()

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


@dataclass
class StartedServer:
    url: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def start_server(
    model_store: Path, settings: Mapping[str, str], ready_timeout_s: float = 120.0
) -> Iterator[StartedServer]:
    """``python -m service`` on a free port of 127.0.0.1 with ``DEIT_*`` settings, stopped (SIGTERM) afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEIT_")}
    env.update({f"DEIT_{k.upper()}": v for k, v in settings.items()})
    env.update({"DEIT_MODEL_STORE": str(model_store), "DEIT_HOST": "127.0.0.1", "DEIT_PORT": str(port)})
    process = subprocess.Popen(
        [sys.executable, "-m", "service"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {ready_timeout_s}s")
            time.sleep(0.1)
        yield StartedServer(url, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server")
    target.add_argument("--model-store", type=Path, help="start `python -m service` on this store")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="DEIT_NAME for --model-store")
    parser.add_argument("--server-pid", type=int, help="sample this process's RSS (with --url)")
    parser.add_argument("--concurrency", type=int, default=32, help="clients, each with one request in flight")
    parser.add_argument(
        "--baseline-concurrency", type=int, help="first run this many clients (e.g. the queue size) and print ratios"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--distinct-images", type=int, default=8, help="synthetic inputs to cycle through")
    parser.add_argument("--image", type=Path, action="append", default=[], help="use these files instead")
    parser.add_argument("--model", help="model name (default model when omitted)")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request, seconds")
    parser.add_argument("--backoff-ms", type=float, default=0.0, help="pause after a 503 before the next request")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return parser


def _print(label: str, summary: dict[str, Any]) -> None:
    print(f"{label}: {summary['elapsed_s']} s, {summary['requests']} requests")
    print(f"  accepted:  {summary['images_ok']} images, {summary['images_per_s']} img/s")
    print(f"  latency:   p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms (200 responses)")
    print(f"  statuses:  {summary['statuses']}  codes: {summary['error_codes']}")
    if summary["transport_errors"]:
        print(f"  transport: {summary['transport_errors']}")
    if summary["peak_rss_mib"] is not None:
        print(f"  peak RSS:  {summary['peak_rss_mib']} MiB")
    print(f"  top-1 inconsistent for images: {summary['inconsistent_images'] or 'none'}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    images = [p.read_bytes() for p in args.image] or sample_images(args.distinct_images)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    settings = dict(item.split("=", 1) for item in args.set)

    def load(url: str, pid: int | None, concurrency: int) -> dict[str, Any]:
        report = asyncio.run(
            run_load(
                url, images, concurrency=concurrency, duration_s=args.duration,
                images_per_request=args.images_per_request, model=args.model, headers=headers,
                timeout_s=args.timeout, backoff_s=args.backoff_ms / 1000, server_pid=pid,
            )
        )  # fmt: skip
        return report.summary()

    def runs(url: str, pid: int | None) -> dict[str, dict[str, Any]]:
        results = {}
        if args.baseline_concurrency:
            results["baseline"] = load(url, pid, args.baseline_concurrency)
        results["load"] = load(url, pid, args.concurrency)
        return results

    if args.url:
        results = runs(args.url.rstrip("/"), args.server_pid)
    else:
        with start_server(args.model_store, settings) as server:
            results = runs(server.url, server.process.pid)
    if args.json:
        print(json.dumps(results))
        return 0
    for name, summary in results.items():
        clients = args.baseline_concurrency if name == "baseline" else args.concurrency
        _print(f"{name}, concurrency {clients}", summary)
    base, load_ = results.get("baseline"), results["load"]
    if base is not None and base["images_per_s"] > 0 and base["p50_ms"] > 0:
        print(
            f"load vs baseline: p50 ×{load_['p50_ms'] / base['p50_ms']:.2f}, "
            f"img/s ×{load_['images_per_s'] / base['images_per_s']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
