"""Mixed classify + embed traffic against one model: do the two kinds of request share forward passes?

One server (started here on a free port), closed-loop phases repeated ``--rounds`` times in turn: ``--concurrency``
clients classifying; the same number, half classifying and half embedding; all embedding; and, as the control, only
the classifying half of the mixed phase. Each phase reports img/s, p50 latency, and the mean of ``deit_batch_size``
over its forward passes (from /metrics, the difference of the histogram's sum and count across the phase). Mixed
batches as large as those of one kind at full concurrency, and larger than the control's, mean that both kinds were
answered from the same passes: were each kind batched on its own, a mixed batch would be the control's size.

    .venv/bin/python -m benchmarks.mixed_traffic --concurrency 16 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.loadgen import ServerSpec, multipart, python_module, running
from harness.launcher import REPO
from harness.load import sample_images

# name: the endpoints its clients take in turn, and the share of --concurrency it runs at.
PHASES: dict[str, tuple[tuple[str, ...], float]] = {
    "classify only": (("/classify",), 1.0),
    "mixed classify + embed": (("/classify", "/embed"), 1.0),
    "embed only": (("/embed",), 1.0),
    "control: the classify half alone": (("/classify",), 0.5),
}


@dataclass
class Phase:
    name: str
    images: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    batches: float = 0.0
    batched_images: float = 0.0


def _histogram(metrics_text: str, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram, all models together."""
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


async def _phase(base: str, name: str, images: Sequence[bytes], concurrency: int, duration_s: float) -> Phase:
    """Closed loop: each client always has one one-image request in flight, for ``duration_s`` seconds."""
    paths, share = PHASES[name]
    concurrency = max(1, round(concurrency * share))
    bodies = [multipart(data, f"{i}.png", media_type="image/png") for i, data in enumerate(images)]
    result = Phase(name)
    async with httpx.AsyncClient(timeout=60) as admin:
        before = _histogram((await admin.get(f"{base}/metrics")).text, "deit_batch_size")
        ends = time.perf_counter() + duration_s

        async def client(worker: int) -> None:
            path = paths[worker % len(paths)]
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            async with httpx.AsyncClient(timeout=60, limits=limits) as http:
                sent = 0
                while time.perf_counter() < ends:
                    body = bodies[(worker + sent * concurrency) % len(bodies)]
                    sent += 1
                    started = time.perf_counter()
                    r = await http.post(base + path, content=body.content, headers={"content-type": body.content_type})
                    if r.status_code == 200:
                        result.images += 1
                        result.latencies_s.append(time.perf_counter() - started)
                    else:
                        result.errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(client(w) for w in range(concurrency)))
        result.seconds = time.perf_counter() - started
        after = _histogram((await admin.get(f"{base}/metrics")).text, "deit_batch_size")
    result.batched_images, result.batches = after[0] - before[0], after[1] - before[1]
    return result


async def _run(base: str, concurrency: int, duration_s: float, rounds: int) -> dict[str, list[Phase]]:
    images = sample_images(32)
    await _phase(base, "mixed classify + embed", images, concurrency, 2.0)  # warm the connections and the model
    results: dict[str, list[Phase]] = {name: [] for name in PHASES}
    for _ in range(rounds):
        for name in PHASES:
            results[name].append(await _phase(base, name, images, concurrency, duration_s))
    return results


def _table(results: dict[str, list[Phase]], concurrency: int) -> str:
    rows = [
        "| traffic | clients | img/s | p50 ms | mean deit_batch_size | forward passes | errors |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, phases in results.items():
        clients = max(1, round(concurrency * PHASES[name][1]))
        images = sum(p.images for p in phases)
        seconds = sum(p.seconds for p in phases)
        latencies = [t for p in phases for t in p.latencies_s]
        batches = sum(p.batches for p in phases)
        batched = sum(p.batched_images for p in phases)
        p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
        mean = batched / batches if batches else float("nan")
        errors = sum(p.errors for p in phases)
        rows.append(
            f"| {name} | {clients} | {images / seconds:.1f} | {p50:.1f} | {mean:.2f} | {batches:.0f} | {errors} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-store", type=Path, default=REPO / "service" / "data" / "model_store")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="times each phase runs, in turn")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a DEIT_* setting")
    args = parser.parse_args(argv)
    env = {"DEIT_MODEL_STORE": str(args.model_store), "DEIT_PORT": "{port}", "DEIT_HOST": "127.0.0.1"}
    env["DEIT_ACCESS_LOG"] = "false"
    for item in args.set:
        name, _, value = item.partition("=")
        env[f"DEIT_{name.upper()}"] = value
    spec = ServerSpec("deit-serve", python_module("service"), "/readyz", "", env)
    with tempfile.TemporaryDirectory() as tmp, running(spec, Path(tmp) / "server.log") as server:
        results = asyncio.run(_run(server.url, args.concurrency, args.duration, args.rounds))
    print(_table(results, args.concurrency))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
