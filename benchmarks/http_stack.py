"""What the request path's optional speed-ups are worth: uvloop + httptools, and orjson, each taken away in turn.

The service runs the embedded demo model (a forward pass of well under a millisecond per image) on its small
sample PNGs, so that the HTTP path, not the model, is what the closed loop measures. Each variant is a fresh
``python -m service`` process in which the named modules cannot be imported (uvicorn then falls back to
asyncio's loop and h11; responses to the stdlib ``json``); variants alternate over ``--rounds`` so that drift of
a shared machine falls on all of them. One more variant swaps the service's HTTP protocol (its head, time and
connection limits, service/http/protocol.py) for uvicorn's own httptools one, to show what the limits cost.
Prints img/s and the server's CPU per request, each as a ratio to the variant with everything installed (``fast``).

    .venv/bin/python -m benchmarks.http_stack --concurrency 32 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.loadgen import Body, ServerSpec, multipart, run_closed_loop, running, wait_until_quiet
from harness.launcher import REPO

# Modules hidden from the server in each variant.
VARIANTS: dict[str, tuple[str, ...]] = {
    "fast": (),
    "fast, uvicorn's own protocol": (),
    "no uvloop/httptools": ("uvloop", "httptools"),
    "no orjson": ("orjson",),
    "none of them": ("uvloop", "httptools", "orjson"),
}
# Variants whose server runs uvicorn's httptools protocol instead of the service's, which bounds the request head,
# its time and the connections: the difference is what those limits cost per request.
UNLIMITED = {"fast, uvicorn's own protocol"}
DEMO_STORE = REPO / "model_store"


def _spec(blocked: Sequence[str], unlimited: bool = False) -> ServerSpec:
    patch = "cli.http_options = lambda settings: {'http': 'httptools'}; " if unlimited else ""
    launcher = (
        f"import sys; sys.modules.update(dict.fromkeys({list(blocked)!r})); from service import cli; {patch}cli.main()"
    )
    env = {
        "DEIT_MODEL_STORE": str(DEMO_STORE),
        "DEIT_HOST": "127.0.0.1",
        "DEIT_PORT": "{port}",
        "DEIT_ACCESS_LOG": "false",
    }
    return ServerSpec("ours", [sys.executable, "-c", launcher], "/readyz", "/classify", env)


def _bodies() -> list[Body]:
    samples = sorted((DEMO_STORE / "deit-tiny-digits" / "samples").glob("*.png"))
    return [multipart(p.read_bytes(), p.name, media_type="image/png") for p in samples]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of each measured window")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="measure only these (with fast)"
    )
    args = parser.parse_args(argv)
    variants = {name: VARIANTS[name] for name in VARIANTS if name == "fast" or name in args.variants}
    bodies = _bodies()
    img_s: dict[str, list[float]] = {name: [] for name in variants}
    cpu_ms: dict[str, list[float]] = {name: [] for name in variants}
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="deit-http-") as tmp:
        for r in range(args.rounds):
            for name, blocked in variants.items():
                wait_until_quiet(timeout_s=30)
                with running(_spec(blocked, name in UNLIMITED), Path(tmp) / f"{r}-{len(img_s[name])}.log") as server:
                    run_closed_loop(server.url, bodies, concurrency=4, warmup_s=0, duration_s=1.0)
                    result = run_closed_loop(
                        server.url,
                        bodies,
                        concurrency=args.concurrency,
                        warmup_s=1.0,
                        duration_s=args.duration,
                        server_pgid=server.pgid,
                        drain=False,
                    )
                if result.errors:
                    raise SystemExit(f"{name}: errors {result.errors}")
                img_s[name].append(result.img_s)
                if result.cpu is not None:
                    cpu_ms[name].append(result.cpu.server * cores / result.img_s * 1000)
                print(f"  round {r + 1}  {name:29s} {result.img_s:7.1f} img/s", flush=True)
    base_img, base_cpu = statistics.median(img_s["fast"]), statistics.median(cpu_ms["fast"] or [float("nan")])
    print(f"\nc={args.concurrency}, demo model, medians of {args.rounds} rounds\n")
    print("| variant | img/s | vs fast | server CPU ms / request | vs fast |")
    print("|---|--:|--:|--:|--:|")
    for name in variants:
        i = statistics.median(img_s[name])
        c = statistics.median(cpu_ms[name] or [float("nan")])
        print(f"| {name} | {i:.0f} | {i / base_img:.2f}× | {c:.2f} | {c / base_cpu:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
