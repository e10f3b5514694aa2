"""What tracing costs: the same load on two servers of one model, tracing off and on (sampling every request,
spans exported over OTLP/HTTP to a receiver on loopback that discards them), in interleaved rounds; img/s and
p50/p99 of each, and on's img/s over off's in the same round.

    python -m benchmarks.tracing_cost --model tiny --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from benchmarks import assets
from benchmarks.loadgen import ServerSpec, multipart, python_module, run_closed_loop, running

TOP_K = 5


@contextlib.contextmanager
def discarding_collector() -> Iterator[str]:
    """An OTLP/HTTP endpoint on loopback that reads and drops what it is sent; yields its traces URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    finally:
        server.shutdown()
        server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", choices=sorted(assets.VARIANTS), default="tiny")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    model_dir = assets.checkpoint(args.model)
    bodies = [multipart(p, f"photo{i}.jpg") for i, p in enumerate(assets.photos("640x480"))]
    base = {"DEIT_MODEL_STORE": str(model_dir.parent), "DEIT_DTYPE": "float32", "DEIT_HOST": "127.0.0.1",
            "DEIT_PORT": "{port}", "DEIT_ACCESS_LOG": "false"}  # fmt: skip
    results: dict[str, list[tuple[float, float, float]]] = {"off": [], "on": []}
    logs = Path(tempfile.gettempdir())
    with discarding_collector() as collector:
        on_env = {**base, "DEIT_OTLP_ENDPOINT": collector, "OTEL_TRACES_SAMPLER": "always_on"}
        off = ServerSpec("off", python_module("service"), "/readyz", f"/classify?top_k={TOP_K}", base)
        on = ServerSpec("on", python_module("service"), "/readyz", f"/classify?top_k={TOP_K}", on_env)
        with (
            running(off, logs / "deit-tracing-off.log") as off_server,
            running(on, logs / "deit-tracing-on.log") as on_server,
        ):
            servers = {"off": off_server, "on": on_server}
            for server in servers.values():  # lazy initialisation: not measured
                run_closed_loop(server.url, bodies, concurrency=4, warmup_s=0, duration_s=1.0)
            for r in range(args.rounds):
                for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    server = servers[name]
                    result = run_closed_loop(
                        server.url, bodies, concurrency=args.concurrency, warmup_s=args.warmup,
                        duration_s=args.duration, server_pgid=server.pgid,
                    )  # fmt: skip
                    results[name].append((result.img_s, result.p50_ms, result.p99_ms))
                    other = f"  other tenants {result.cpu.other:.0%}" if result.cpu else ""
                    print(f"  {r + 1} tracing {name:<3} {result.img_s:7.1f} img/s  p50 {result.p50_ms:7.1f} ms  "
                          f"p99 {result.p99_ms:7.1f} ms{other}", flush=True)  # fmt: skip
    ratios = [on_[0] / off_[0] for on_, off_ in zip(results["on"], results["off"], strict=True) if off_[0] > 0]
    print("\n| tracing | img/s | p50 ms | p99 ms |\n|---|--:|--:|--:|")
    for name, rows in results.items():
        img_s, p50, p99 = (statistics.median(column) for column in zip(*rows, strict=True))
        print(f"| {name} | {img_s:.1f} | {p50:.0f} | {p99:.0f} |")
    print(f"\non ÷ off img/s, median of the rounds' ratios: {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
