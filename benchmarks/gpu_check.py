"""GPU check: raw forward of DeiT-base in fp16 (ours, ours with CUDA graphs, transformers) at batch 1 / 64 / 256,
then end to end through a real server (one 640×480 JPEG per request, c = 64 / 256; decoding on the CPU, then on the
GPU with ``--preprocess-device cuda``), as one table.

End to end is compared with ours' raw forward at its best batch size (the target is ≥ 0.8 of it). Run by
``benchmarks/gpu_check.sh`` on a CUDA machine; ``--pytest`` takes the parity tests' summary line for the table.

    .venv/bin/python -m benchmarks.gpu_check --pytest "5 passed"
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from benchmarks import assets
from benchmarks.loadgen import ServerSpec, multipart, python_module, run_closed_loop, running
from service.model.prepare import load_for_serving


def _img_s(fn: Callable[[], object], batch: int, seconds: float) -> float:
    """Median img/s over short timed windows, after a warm-up call."""
    fn()
    torch.cuda.synchronize()
    rates = []
    for _ in range(5):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 5:
            fn()
            calls += 1
        torch.cuda.synchronize()
        rates.append(batch * calls / (time.perf_counter() - start))
    return statistics.median(rates)


def _logits(model: torch.nn.Module, x: Tensor) -> Tensor:
    return model(pixel_values=x).logits


def raw_forward(model_dir: Path, batches: Sequence[int], seconds: float) -> tuple[list[tuple[str, str, str]], float]:
    """Rows of the table, and ours' best img/s over the batch sizes (with or without graphs)."""
    from transformers import DeiTForImageClassificationWithTeacher

    rows: list[tuple[str, str, str]] = []
    reference = DeiTForImageClassificationWithTeacher.from_pretrained(
        model_dir, dtype=torch.float16, attn_implementation="sdpa"
    )
    reference = reference.to("cuda").eval()
    ours = load_for_serving(model_dir, device="cuda", dtype="float16", max_batch_size=max(batches)).model
    graphed = load_for_serving(
        model_dir, device="cuda", dtype="float16", max_batch_size=max(batches), cuda_graphs=True
    ).model
    best = 0.0
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            runs: dict[str, Callable[[], Tensor]] = {
                "ours": functools.partial(ours, x),
                "ours + CUDA graphs": functools.partial(graphed, x),
                "transformers": functools.partial(_logits, reference, x),
            }
            gap = (runs["ours"]().float() - runs["transformers"]().float()).abs().max().item()
            rates = {name: _img_s(fn, batch, seconds) for name, fn in runs.items()}
        best = max(best, rates["ours"], rates["ours + CUDA graphs"])
        for name, rate in rates.items():
            rows.append((f"raw forward, {name}", f"batch {batch}", f"{rate:.0f} img/s"))
        rows.append(("raw forward, max |ours - transformers| logit", f"batch {batch}", f"{gap:.1e}"))
    rows.append(("raw forward, ours at its best batch", "", f"{best:.0f} img/s"))
    return rows, best


def end_to_end(
    model_dir: Path, concurrency: Sequence[int], duration: float, best_raw: float
) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    bodies = [multipart(data, f"{i}.jpg") for i, data in enumerate(assets.photos("640x480"))]
    threads = max(2, (os.cpu_count() or 4) - 2)
    configurations = (
        ("ours", "false", "cpu"),
        ("ours + CUDA graphs", "true", "cpu"),
        ("ours + CUDA graphs + GPU decoding", "true", "cuda"),
    )
    for label, graphs, decoding in configurations:
        env = {
            "DEIT_MODEL_STORE": str(model_dir.parent), "DEIT_HOST": "127.0.0.1", "DEIT_PORT": "{port}",
            "DEIT_DEVICE": "cuda", "DEIT_DTYPE": "float16", "DEIT_MAX_BATCH_SIZE": str(max(concurrency)),
            "DEIT_MAX_QUEUE_SIZE": str(4 * max(concurrency)), "DEIT_PREPROCESS_THREADS": str(threads),
            "DEIT_CUDA_GRAPHS": graphs, "DEIT_PREPROCESS_DEVICE": decoding, "DEIT_ACCESS_LOG": "false",
        }  # fmt: skip
        spec = ServerSpec("ours", python_module("service"), "/readyz", "/classify", env)
        with tempfile.TemporaryDirectory() as tmp, running(spec, Path(tmp) / "server.log") as server:
            for c in concurrency:
                result = run_closed_loop(server.url, bodies, concurrency=c, warmup_s=3.0, duration_s=duration)
                errors = f", errors {result.errors}" if result.errors else ""
                ratio = result.img_s / best_raw
                rows.append((
                    f"end to end, {label}, 640×480 JPEG", f"c = {c}",
                    f"{result.img_s:.0f} img/s, p50 {result.p50_ms:.0f} ms, p99 {result.p99_ms:.0f} ms, "
                    f"{ratio:.2f} of raw best{errors}",
                ))  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pytest", default="not run", help="the CUDA parity tests' summary line")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 256])
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[64, 256])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per raw-forward measurement")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each end-to-end window")
    args = parser.parse_args(argv)
    # `timeout` ends this with SIGTERM: unwind, so that the servers started here are stopped, not left on the GPU.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    model_dir = assets.checkpoint("base")
    rows = [("CUDA parity tests", "", args.pytest)]
    raw_rows, best_raw = raw_forward(model_dir, args.batches, args.seconds)
    rows += raw_rows
    torch.cuda.empty_cache()
    rows += end_to_end(model_dir, args.concurrency, args.duration, best_raw)
    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}, DeiT-base distilled fp16, {os.cpu_count()} CPUs")
    print("| check | at | result |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
