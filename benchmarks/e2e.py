"""End to end: deit-serve against a hand-rolled FastAPI server and LitServe, and against the pipeline limit.

For each model and dtype, in this order, each process alone on the machine while it is measured:

1. ``benchmarks/pipeline_limit.py`` in a child process: raw forward (ours and transformers'), one image's
   preprocess + forward, and decode + preprocess + forward with and without overlap (the pipeline limit);
2. the three servers started and warmed up side by side — ours (``python -m service``),
   ``peers/fastapi_pipeline.py`` and ``peers/litserve_server.py``, the same checkpoint and dtype for all — then
   driven in turn by a closed loop, one JPEG per request: for each of ``--rounds`` rounds, each concurrency, each
   server (the order reversed every other round), one measured window, in-flight answers awaited before the next.
   Only the server under load runs: the others are paused (SIGSTOP to their process group; an idle LitServe
   polls its queues and would take a tenth of the machine from the server being measured). Interleaving puts
   the drift of a shared machine on all servers alike: each server's figure is its median over the rounds, and
   each ratio the median of the ratios within a round.

Then one table with img/s, p50 and p99 of each server and the ratios of ours to the peers and to the limit, and
the targets checked. Results also go to a JSON file.

    .venv/bin/python -m benchmarks.e2e                 # full run: tiny fp32 + bf16, small at the service's dtype
    .venv/bin/python -m benchmarks.e2e --quick         # tiny, c=1 and 32, short windows (about 2 minutes)
    .venv/bin/python -m benchmarks.e2e --model tiny --dtype float32 --servers ours --set torch_threads=1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import assets
from benchmarks.loadgen import (
    Body,
    LoadResult,
    RunningServer,
    ServerSpec,
    multipart,
    python_module,
    run_closed_loop,
    running,
    wait_until_quiet,
)
from benchmarks.pipeline_limit import PipelineResult
from service.settings import Settings

SERVERS = ("ours", "fastapi", "litserve")
SERVER_TITLES = {"ours": "deit-serve", "fastapi": "FastAPI + pipeline", "litserve": "LitServe"}
DEFAULTS = {name: f.default for name, f in Settings.model_fields.items()}

# Targets on the reference case (DeiT-tiny, 640×480 JPEG, c=32; c=1 for latency).
TARGET_VS_FASTAPI = 2.5
TARGET_VS_LITSERVE = 2.0
TARGET_VS_LIMIT = 0.85
TARGET_P99_BATCHES = 2.0
TARGET_C1_LATENCY = 1.2
TARGET_VS_OPENVINO_FORWARD = 0.85  # DeiT-small: end to end against OpenVINO's forward alone (no decoding, no HTTP)


@dataclass
class ServerRun:
    server: str
    model: str
    dtype: str
    settings: dict[str, str]
    busy_before: float  # fraction of the machine busy with other work just before the servers started
    rounds: dict[int, list[LoadResult]] = field(default_factory=dict)  # by concurrency, one per round

    @property
    def levels(self) -> list[LoadResult]:
        return [level for c in self.rounds if (level := self.at(c)) is not None]

    def at(self, concurrency: int) -> LoadResult | None:
        """The round with the median img/s (the lower of the middle two for an even count)."""
        results = sorted(self.rounds.get(concurrency, []), key=lambda r: r.img_s)
        return results[(len(results) - 1) // 2] if results else None


def paired_ratio(ours: ServerRun | None, peer: ServerRun | None, concurrency: int) -> float | None:
    """Median over rounds of ours' img/s over the peer's in the same round."""
    if ours is None or peer is None:
        return None
    pairs = zip(ours.rounds.get(concurrency, []), peer.rounds.get(concurrency, []), strict=False)
    ratios = [a.img_s / b.img_s for a, b in pairs if b.img_s > 0]
    return statistics.median(ratios) if ratios else None


def resolved_auto_dtype() -> str:
    import torch

    from service.model.checkpoints import resolve_dtype

    return str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")


def server_spec(server: str, model_dir: Path, dtype: str, settings: dict[str, str]) -> ServerSpec:
    batch = settings.get("max_batch_size", str(DEFAULTS["max_batch_size"]))
    delay_ms = float(settings.get("max_batch_delay_ms", str(DEFAULTS["max_batch_delay_ms"])))
    if server == "ours":
        env = {f"DEIT_{k.upper()}": v for k, v in settings.items()}
        env.update(DEIT_MODEL_STORE=str(model_dir.parent), DEIT_DTYPE=dtype, DEIT_HOST="127.0.0.1", DEIT_PORT="{port}")
        return ServerSpec("ours", python_module("service"), "/readyz", "/classify", env)
    common = ["--model-dir", str(model_dir), "--port", "{port}", "--dtype", dtype]
    if server == "fastapi":
        return ServerSpec(server, python_module("benchmarks.peers.fastapi_pipeline", *common), "/health", "/classify")
    if server == "litserve":
        argv = python_module(
            "benchmarks.peers.litserve_server",
            *common,
            "--max-batch-size",
            batch,
            "--batch-timeout",
            f"{delay_ms / 1000}",
        )
        return ServerSpec(server, argv, "/health", "/predict")
    raise ValueError(f"unknown server {server!r}")


def run_pipeline_limit(
    model: str, dtype: str, image_size: str, settings: dict[str, str], scope: str, out: Path
) -> PipelineResult:
    """``benchmarks/pipeline_limit.py`` in a child process; ``scope``: full, reduced (batch 8 only) or quick."""
    batch = int(settings.get("max_batch_size", DEFAULTS["max_batch_size"]))
    sizes = {"full": [8, 16, 32], "reduced": [8], "quick": [16]}[scope]
    argv = python_module(
        "benchmarks.pipeline_limit",
        "--model", model,
        "--dtype", dtype,
        "--image-size", image_size,
        "--max-batch-size", str(batch),
        "--batch-sizes", ",".join(str(b) for b in sizes),
        *(["--forward-batches", "1,8"] if scope == "reduced" else []),
        "--torch-threads", settings.get("torch_threads", str(DEFAULTS["torch_threads"])),
        "--preprocess-threads", settings.get("preprocess_threads", str(DEFAULTS["preprocess_threads"])),
        "--forward-workers", settings.get("forward_workers", str(DEFAULTS["forward_workers"])),
        "--seconds", "3" if scope == "full" else "1",
        "--json", str(out),
        *(["--jpeg-draft"] if settings.get("jpeg_draft", "").lower() in ("1", "true", "yes", "on") else []),
    )  # fmt: skip
    subprocess.run(argv, check=True, cwd=Path(__file__).resolve().parent.parent)
    return PipelineResult.from_json(json.loads(out.read_text())[0])


def run_raw_model(model: str, dtype: str, scope: str) -> None:
    """``benchmarks/model_forward.py``: our forward against transformers', same weights and dtype."""
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    argv = [
        sys.executable,
        "benchmarks/model_forward.py",
        "--sizes", model,
        "--dtypes", short[dtype],
        "--batches", "1,32" if scope == "full" else "1",
        "--rounds", "3",
        "--round-time", "0.3",
    ]  # fmt: skip
    subprocess.run(argv, check=True, cwd=Path(__file__).resolve().parent.parent)


@dataclass(frozen=True)
class Case:
    """One model at one dtype; ``scope`` is how much of it is measured (full, reduced or quick)."""

    model: str
    dtype: str
    concurrency: tuple[int, ...]
    scope: str


def plan(
    models: Sequence[str] | None, dtypes: Sequence[str] | None, concurrency: Sequence[int], quick: bool
) -> list[Case]:
    """By default: tiny at the service's auto dtype and at the other one (c=1 and 32 only), small at auto."""
    auto = resolved_auto_dtype()
    if quick:
        return [Case(m, d, tuple(concurrency), "quick") for m in models or ["tiny"] for d in dtypes or [auto]]
    if models or dtypes:
        return [Case(m, d, tuple(concurrency), "full") for m in models or ["tiny"] for d in dtypes or [auto]]
    other = "bfloat16" if auto == "float32" else "float32"
    reduced = tuple(c for c in concurrency if c in (1, 32)) or tuple(concurrency)
    return [
        Case("tiny", auto, tuple(concurrency), "full"),
        Case("tiny", other, reduced, "reduced"),
        Case("small", auto, tuple(concurrency), "full"),
    ]


def measure_case(
    runs: dict[str, ServerRun],
    specs: dict[str, ServerSpec],
    bodies: Sequence[Body],
    concurrencies: Sequence[int],
    rounds: int,
    warmup_s: float,
    duration_s: float,
    log_dir: Path,
) -> None:
    """Start every server of one case, then measure them in turn (see the module's docstring)."""
    with contextlib.ExitStack() as stack:
        live: dict[str, RunningServer] = {}
        stack.callback(_resume_all, live)  # a stopped process group would not act on SIGTERM
        for name, spec in specs.items():
            run = runs[name]
            live[name] = stack.enter_context(running(spec, log_dir / f"{name}-{run.model}-{run.dtype}.log"))
            # First requests after start-up pay for lazy initialisation (thread pools, allocator): not measured.
            run_closed_loop(live[name].url, bodies, concurrency=4, warmup_s=0, duration_s=max(2.0, warmup_s))
            os.killpg(live[name].pgid, signal.SIGSTOP)
        for r in range(rounds):
            for c in concurrencies:
                for name in list(live) if r % 2 == 0 else list(live)[::-1]:
                    server, run = live[name], runs[name]
                    _resume(server)
                    result = run_closed_loop(
                        server.url,
                        bodies,
                        concurrency=c,
                        warmup_s=warmup_s,
                        duration_s=duration_s,
                        server_pgid=server.pgid,
                    )
                    os.killpg(server.pgid, signal.SIGSTOP)
                    run.rounds.setdefault(c, []).append(result)
                    print(_line(r, run, result), flush=True)


def _resume_all(live: dict[str, RunningServer]) -> None:
    for server in live.values():
        _resume(server)


def _resume(server: RunningServer) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pgid, signal.SIGCONT)
    time.sleep(0.2)  # its timers and threads catch up before load starts


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "-"


def _line(round_index: int, run: ServerRun, result: LoadResult) -> str:
    errors = f"  errors {result.errors}" if result.errors else ""
    cpu = result.cpu
    shares = f"  CPU server {cpu.server:.0%} client {cpu.client:.0%} other {cpu.other:.0%}" if cpu else ""
    return (
        f"  {round_index + 1} {SERVER_TITLES[run.server]:<19} {run.model:<6} {run.dtype:<9} c={result.concurrency:<4} "
        f"{result.img_s:8.1f} img/s  p50 {result.p50_ms:8.1f} ms  p99 {result.p99_ms:8.1f} ms{shares}{errors}"
    )


def _times(ratio: float | None) -> str:
    return f"{ratio:.2f}×" if ratio else "-"


def _cell(r: LoadResult | None) -> str:
    return f"{r.img_s:.1f} | {r.p50_ms:.0f} | {r.p99_ms:.0f}" if r else "- | - | -"


def _other_cpu(levels: Iterable[LoadResult]) -> str:
    """The most CPU that other work on the machine took during any of the measured windows."""
    shares = [lvl.cpu.other for lvl in levels if lvl.cpu is not None]
    return f"{max(shares):.0%}" if shares else "-"


def e2e_table(runs: Sequence[ServerRun], limits: dict[tuple[str, str], PipelineResult]) -> str:
    lines = [
        "| model | dtype | c | ours img/s | p50 ms | p99 ms | FastAPI+pipeline img/s | p50 ms | p99 ms "
        "| LitServe img/s | p50 ms | p99 ms | ours / FastAPI | ours / LitServe | ours / limit | other CPU |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    keys = list(dict.fromkeys((r.model, r.dtype) for r in runs))
    for model, dtype in keys:
        by_server = {r.server: r for r in runs if (r.model, r.dtype) == (model, dtype)}
        concurrencies = sorted({lvl.concurrency for r in by_server.values() for lvl in r.levels})
        limit = limits.get((model, dtype))
        for c in concurrencies:
            ours, fastapi, lit = (by_server[s].at(c) if s in by_server else None for s in SERVERS)
            ours_img_s = ours.img_s if ours else None
            vs = {peer: paired_ratio(by_server.get("ours"), by_server.get(peer), c) for peer in ("fastapi", "litserve")}
            lines.append(
                f"| {model} | {dtype} | {c} | {_cell(ours)} | {_cell(fastapi)} | {_cell(lit)} "
                f"| {_times(vs['fastapi'])} | {_times(vs['litserve'])} "
                f"| {_ratio(ours_img_s, limit.limit_img_s if limit else None)} "
                f"| {_other_cpu(r for r in (ours, fastapi, lit) if r is not None)} |"
            )
    return "\n".join(lines)


def run_ceiling(model: str, batch: int, out: Path) -> float | None:
    """``benchmarks/runtime_ceiling.py`` in a child process: OpenVINO's forward alone, img/s; None without OpenVINO."""
    argv = python_module("benchmarks.runtime_ceiling", "--model", model, "--batch", str(batch), "--json", str(out))
    if subprocess.run(argv, cwd=Path(__file__).resolve().parent.parent).returncode != 0:
        return None
    img_s: float = json.loads(out.read_text())["img_s"]
    return img_s


def targets(
    runs: Sequence[ServerRun],
    limits: dict[tuple[str, str], PipelineResult],
    c_ref: int,
    ceilings: dict[str, float] | None = None,
) -> str:
    lines = []
    for model, ceiling in (ceilings or {}).items():
        for run in (r for r in runs if r.server == "ours" and r.model == model):
            if (at_ceiling := run.at(c_ref)) is None:
                continue
            share = at_ceiling.img_s / ceiling
            verdict = "met" if share >= TARGET_VS_OPENVINO_FORWARD else "MISSED"
            lines.append(
                f"| {model} | {run.dtype} | img/s vs OpenVINO's forward alone ({ceiling:.1f} img/s) at c={c_ref} "
                f"| {share:.2f} | ≥ {TARGET_VS_OPENVINO_FORWARD} | {verdict} |"
            )
    for (model, dtype), limit in limits.items():
        by_server = {r.server: r for r in runs if (r.model, r.dtype) == (model, dtype)}
        ours = by_server.get("ours")
        if ours is None:
            continue
        at_ref, at_one = ours.at(c_ref), ours.at(1)
        checks: list[tuple[str, float | None, float, bool]] = []  # name, value, target, higher is better
        if at_ref is not None:
            for peer, target in (("fastapi", TARGET_VS_FASTAPI), ("litserve", TARGET_VS_LITSERVE)):
                value = paired_ratio(ours, by_server.get(peer), c_ref)
                checks.append((f"img/s vs {SERVER_TITLES[peer]} at c={c_ref}", value, target, True))
            checks.append(
                (f"img/s vs pipeline limit at c={c_ref}", at_ref.img_s / limit.limit_img_s, TARGET_VS_LIMIT, True)
            )
            if limit.max_batch_ms:
                checks.append(
                    (
                        f"p99 at c={c_ref} / one batch of {limit.max_batch_size} ({limit.max_batch_ms:.0f} ms)",
                        at_ref.p99_ms / limit.max_batch_ms,
                        TARGET_P99_BATCHES,
                        False,
                    )
                )
        if at_one is not None:
            checks.append(
                (
                    f"p50 at c=1 / one image preprocess + forward ({limit.single_image_ms:.1f} ms)",
                    at_one.p50_ms / limit.single_image_ms,
                    TARGET_C1_LATENCY,
                    False,
                )
            )
        for name, value, target, higher in checks:
            if value is None:
                continue
            met = value >= target if higher else value <= target
            sign = "≥" if higher else "≤"
            lines.append(
                f"| {model} | {dtype} | {name} | {value:.2f} | {sign} {target} | {'met' if met else 'MISSED'} |"
            )
    if not lines:
        return ""
    return "\n".join(["| model | dtype | check | measured | target | |", "|---|---|---|--:|--:|---|", *lines])


def _settings(pairs: Sequence[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().lower().removeprefix("deit_")
        if not sep or name not in Settings.model_fields:
            raise SystemExit(f"--set {pair!r}: expected name=value with a deit-serve setting name")
        settings[name] = value
    return settings


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=_csv, help="comma-separated: tiny,small,base (default: tiny and small)")
    parser.add_argument(
        "--dtype", type=_csv, help="float32,bfloat16 (default: both for tiny, the service's auto dtype for the rest)"
    )
    parser.add_argument("--servers", type=_csv, default=list(SERVERS), help="comma-separated: ours,fastapi,litserve")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in _csv(s)], default=[1, 8, 32, 128])
    parser.add_argument("--image-size", choices=sorted(assets.IMAGE_SIZES), default="640x480")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds of load before each measured window")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of each measured window")
    parser.add_argument("--rounds", type=int, default=2, help="measured windows per server and concurrency")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a deit-serve setting for our server (and the pipeline limit, where it applies)",
    )
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=120.0,
        help="before each part, wait up to this many seconds for the machine to be idle (0: do not wait)",
    )
    parser.add_argument("--no-pipeline", dest="pipeline", action="store_false", help="skip the pipeline limit")
    parser.add_argument("--quick", action="store_true", help="tiny at the auto dtype, c=1,32, short windows")
    parser.add_argument(
        "--ceiling", action="store_true", help="also time OpenVINO's forward alone per model and hold ours to it"
    )
    parser.add_argument("--json", type=Path, help="results file (default: in the benchmark cache directory)")
    args = parser.parse_args(argv)

    auto = resolved_auto_dtype()
    if args.quick:
        args.concurrency = [1, 32] if args.concurrency == [1, 8, 32, 128] else args.concurrency
        args.warmup, args.duration = min(args.warmup, 1.0), min(args.duration, 3.0)
    cases = plan(args.model, args.dtype, args.concurrency, args.quick)
    settings = _settings(args.settings)
    bodies = [multipart(data, f"{i}.jpg") for i, data in enumerate(assets.photos(args.image_size))]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(tempfile.mkdtemp(prefix=f"e2e-{stamp}-", dir=assets.cache_dir()))
    json_path = args.json or out_dir / "results.json"

    import torch

    print(
        f"{dt.date.today()} · {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}) · torch "
        f"{torch.__version__} · auto dtype {auto} · {args.image_size} JPEG · load average {os.getloadavg()[0]:.2f}"
        f"\nour settings: {settings or 'defaults'} · logs in {out_dir}",
        flush=True,
    )
    limits: dict[tuple[str, str], PipelineResult] = {}
    ceilings: dict[str, float] = {}
    runs: list[ServerRun] = []

    started = time.monotonic()

    def clock() -> str:
        elapsed = int(time.monotonic() - started)
        return f"[{elapsed // 60}:{elapsed % 60:02d}]"

    def quiet() -> float:
        if args.quiet_timeout <= 0:
            return math.nan
        busy = wait_until_quiet(timeout_s=args.quiet_timeout)
        if busy > 0.1:
            print(f"  (the machine is still {busy:.0%} busy with other work after {args.quiet_timeout:g}s)", flush=True)
        return busy

    for model in dict.fromkeys(case.model for case in cases):
        model_cases = [case for case in cases if case.model == model]
        model_dir = assets.checkpoint(model)
        if args.pipeline:
            print(f"\n## raw model, DeiT-{model} (benchmarks/model_forward.py) {clock()}", flush=True)
            for case in model_cases:
                quiet()
                run_raw_model(model, case.dtype, case.scope)
            print(f"\n## pipeline limit, DeiT-{model} {clock()}", flush=True)
            for case in model_cases:
                quiet()
                out = out_dir / f"pipeline-{model}-{case.dtype}.json"
                limits[(model, case.dtype)] = run_pipeline_limit(
                    model, case.dtype, args.image_size, settings, case.scope, out
                )
        if args.ceiling:
            print(f"\n## OpenVINO's forward alone, DeiT-{model} (benchmarks/runtime_ceiling.py) {clock()}", flush=True)
            quiet()
            batch = int(settings.get("max_batch_size", DEFAULTS["max_batch_size"]))
            if (ceiling := run_ceiling(model, batch, out_dir / f"ceiling-{model}.json")) is not None:
                ceilings[model] = ceiling
        print(f"\n## end to end, DeiT-{model} {clock()}", flush=True)
        for case in model_cases:
            busy = quiet()
            case_runs = {
                server: ServerRun(server, model, case.dtype, settings if server == "ours" else {}, busy)
                for server in args.servers
            }
            specs = {server: server_spec(server, model_dir, case.dtype, settings) for server in args.servers}
            measure_case(case_runs, specs, bodies, case.concurrency, args.rounds, args.warmup, args.duration, out_dir)
            runs.extend(case_runs.values())

    from benchmarks.pipeline_limit import report

    print("\n## pipeline limit (no HTTP)\n")
    print(report(list(limits.values())))
    print(f"\n## end to end ({args.image_size} JPEG, one image per request; img/s, p50 ms, p99 ms)\n")
    print(e2e_table(runs, limits))
    c_ref = 32 if 32 in args.concurrency else max(args.concurrency)
    checks = targets(runs, limits, c_ref, ceilings)
    if checks:
        print("\n## targets\n")
        print(checks)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}; took {clock()}")
    json_path.write_text(
        json.dumps(
            {
                "date": dt.datetime.now().isoformat(timespec="seconds"),
                "torch": torch.__version__,
                "cpus": os.cpu_count(),
                "image_size": args.image_size,
                "settings": settings,
                "pipeline": [r.to_json() for r in limits.values()],
                "servers": [
                    {
                        "server": r.server,
                        "model": r.model,
                        "dtype": r.dtype,
                        "settings": r.settings,
                        "busy_before": r.busy_before,
                        "rounds": {c: [lvl.summary() for lvl in results] for c, results in r.rounds.items()},
                    }
                    for r in runs
                ],
            },
            indent=2,
        )
    )
    print(f"results: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
