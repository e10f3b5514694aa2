"""Closed-loop load against deit-serve: img/s, latency of accepted requests, status counts, the server's peak RSS.

Each of ``--concurrency`` clients sends a request, waits for the answer, and sends the next, for ``--duration``
seconds. Against a running server (``--url``), or one this script starts on a free port (``--model-store``, with
``--set name=value`` for any ``DEIT_*`` setting), whose RSS it then samples from ``/proc``:

    .venv/bin/python -m benchmarks.load_test --model-store service/data/model_store --concurrency 64 --duration 10 \\
        --set max_queue_size=16 --set max_batch_size=8
    .venv/bin/python -m benchmarks.load_test --url http://127.0.0.1:8000 --concurrency 16 --duration 30 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.launcher import ServerProcess, free_port, running, service_argv, service_env
from harness.load import run_load, sample_images


@contextlib.contextmanager
def start_server(
    model_store: Path, settings: Mapping[str, str], ready_timeout_s: float = 120.0
) -> Iterator[ServerProcess]:
    """``python -m service`` on a free port of 127.0.0.1 with ``DEIT_*`` settings, stopped (SIGTERM) afterwards."""
    port = free_port()
    env = service_env(port, model_store, {f"DEIT_{k.upper()}": v for k, v in settings.items()})
    with (
        tempfile.TemporaryDirectory(prefix="deit-load-test-") as logs,
        running(
            service_argv(), port=port, log_path=Path(logs) / "server.log", env=env, ready_timeout=ready_timeout_s,
            stop_timeout=60,
        ) as server,
    ):  # fmt: skip
        yield server


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
