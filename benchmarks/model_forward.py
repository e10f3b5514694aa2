"""Forward-pass throughput of our DeiT against transformers' (SDPA attention), same weights, dtype and device.

Ours is timed twice: as loaded (q/k/v as three Linears, like transformers) and with the q/k/v projections fused into
one matmul (``DeiT.fuse_attention_projections``, what the service runs).

Both models are timed in one process, in many short alternating rounds; the ratio is the median of the per-round
ratios, so load that drifts in or out skews both sides alike. Random weights; the logits are compared first.
On a shared CPU, ``--threads 1 --clock cpu`` counts only the CPU time this process got.

    .venv/bin/python benchmarks/model_forward.py                       # tiny/small/base × batch 1/8/32
    .venv/bin/python benchmarks/model_forward.py --sizes tiny --batches 1,8 --rounds 5 --round-time 0.3
    .venv/bin/python benchmarks/model_forward.py --sizes tiny --batches 16 --compile   # ours under torch.compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, PreTrainedModel
from transformers.utils import logging as transformers_logging

from service.model.checkpoints import cpu_supports_bf16, load_checkpoint

# The released distilled 224 variants (deit-reference.md): 12 layers, patch 16, MLP ratio 4, head_dim 64.
SIZES: dict[str, tuple[int, int]] = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Result:
    size: str
    dtype: str
    batch: int
    ours_img_s: float
    fused_img_s: float
    hf_img_s: float
    ratio: float
    fused_ratio: float
    fused_vs_unfused: float
    max_abs_diff: float


def hf_config(size: str) -> DeiTConfig:
    hidden, heads = SIZES[size]
    return DeiTConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        num_hidden_layers=12,
        image_size=224,
        patch_size=16,
        num_labels=1000,
        attn_implementation="sdpa",
    )


def build_models(size: str, dtype: torch.dtype, device: torch.device, directory: Path) -> dict[str, nn.Module]:
    """The same random weights as transformers' model, as ours, and as ours fused, all in ``dtype`` on ``device``."""
    if not (directory / "config.json").is_file():
        torch.manual_seed(0)
        DeiTForImageClassificationWithTeacher(hf_config(size)).save_pretrained(directory)
    reference = DeiTForImageClassificationWithTeacher.from_pretrained(
        directory, dtype=dtype, attn_implementation="sdpa"
    )
    reference = reference.to(device).eval().requires_grad_(False)
    ours = load_checkpoint(directory, device=device, dtype=dtype).model
    fused = load_checkpoint(directory, device=device, dtype=dtype).model.fuse_attention_projections()
    return {"transformers": reference, "ours": ours, "fused": fused}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _time_iters(fn: Callable[[], object], iters: int, device: torch.device, clock: Callable[[], float]) -> float:
    """Seconds per call, averaged over ``iters`` back-to-back calls."""
    _sync(device)
    start = clock()
    for _ in range(iters):
        fn()
    _sync(device)
    return (clock() - start) / iters


def compare(
    models: dict[str, nn.Module],
    x: Tensor,
    rounds: int,
    round_time: float,
    device: torch.device,
    clock: Callable[[], float],
) -> tuple[dict[str, float], dict[str, dict[str, float]], float]:
    """Median per-call seconds of each model; per pair (a, b), the median per-round ratio a's time / b's time; the
    largest logit gap of any model to the first (the reference). The order of the models rotates every round."""
    names = list(models)

    def call(name: str) -> Callable[[], Tensor]:
        model = models[name]
        if isinstance(model, PreTrainedModel):
            return lambda: model(pixel_values=x).logits
        return lambda: model(x)

    runs = {name: call(name) for name in names}
    with torch.inference_mode():
        reference = runs[names[0]]().float()
        gap = max((runs[n]().float() - reference).abs().max().item() for n in names[1:])
        # Warm-up (allocator, kernel selection), and a first estimate of the per-call time.
        estimate = max(_time_iters(runs[n], 1, device, clock) for n in names)
        iters = max(1, round(round_time / max(estimate, 1e-6)))
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(rounds):
            for n in names[i % len(names) :] + names[: i % len(names)]:
                times[n].append(_time_iters(runs[n], iters, device, clock))
    ratios = {
        a: {b: statistics.median(ta / tb for ta, tb in zip(times[a], times[b], strict=True)) for b in names}
        for a in names
    }
    return {n: statistics.median(t) for n, t in times.items()}, ratios, gap


def default_dtypes(device: torch.device) -> list[str]:
    return ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]


def run(
    sizes: Sequence[str],
    dtypes: Sequence[str],
    batches: Sequence[int],
    device: torch.device,
    rounds: int,
    round_time: float,
    clock: Callable[[], float],
    compile_ours: bool = False,
) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="deit-bench-") as tmp:
        for size in sizes:
            directory = Path(tmp) / size
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                models = build_models(size, dtype, device, directory)
                if compile_ours:
                    models["ours"] = torch.compile(models["ours"])  # type: ignore[assignment]  # per batch size
                    models["fused"] = torch.compile(models["fused"])  # type: ignore[assignment]
                for batch in batches:
                    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
                    x = x.to(device=device, dtype=dtype)
                    secs, ratios, gap = compare(models, x, rounds, round_time, device, clock)
                    hf = "transformers"
                    result = Result(
                        size, dtype_name, batch, batch / secs["ours"], batch / secs["fused"], batch / secs[hf],
                        ratios[hf]["ours"], ratios[hf]["fused"], ratios["ours"]["fused"], gap,
                    )  # fmt: skip
                    results.append(result)
                    print(_row(result), flush=True)
                del models
    return results


_HEADER = (
    f"{'model':<6} {'dtype':<5} {'batch':>5} {'ours img/s':>11} {'fused img/s':>12} {'transformers img/s':>19} "
    f"{'ratio':>6} {'fused ratio':>12} {'fused/ours':>11} {'max|Δ|':>8}"
)


def _row(r: Result) -> str:
    return (
        f"{r.size:<6} {r.dtype:<5} {r.batch:>5} {r.ours_img_s:>11.1f} {r.fused_img_s:>12.1f} {r.hf_img_s:>19.1f} "
        f"{r.ratio:>6.2f} {r.fused_ratio:>12.2f} {r.fused_vs_unfused:>11.2f} {r.max_abs_diff:>8.1e}"
    )


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=_csv, default=list(SIZES), help="comma-separated: tiny,small,base")
    parser.add_argument("--batches", type=_csv_ints, default=[1, 8, 32], help="comma-separated batch sizes")
    parser.add_argument("--dtypes", type=_csv, default=None, help="fp32,bf16 (CPU); fp32,bf16,fp16 on CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=9, help="alternating timed rounds per model (median taken)")
    parser.add_argument("--round-time", type=float, default=0.5, help="target seconds per model per round")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (use 1 thread)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="ours under torch.compile (inductor), theirs eager")
    args = parser.parse_args(argv)

    unknown = [s for s in args.sizes if s not in SIZES] + [d for d in args.dtypes or [] if d not in DTYPES]
    if unknown:
        parser.error(f"unknown size or dtype: {unknown}")
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()
    device = torch.device(args.device)
    dtypes = args.dtypes or default_dtypes(device)

    cpu_note = "" if device.type == "cuda" else f", native bf16: {cpu_supports_bf16()}"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, {torch.get_num_threads()} threads{cpu_note}")
    if args.clock == "cpu" and (device.type == "cuda" or torch.get_num_threads() > 1):
        parser.error("--clock cpu measures one CPU thread's work: use it with --threads 1 on CPU")
    print(
        f"{args.rounds} rounds × ~{args.round_time:g}s per model, {args.clock} clock; "
        "ratio = median per-round (transformers time / ours time), > 1: ours faster; "
        "fused/ours = unfused time / fused time"
    )
    print(_HEADER, flush=True)
    run(args.sizes, dtypes, args.batches, device, args.rounds, args.round_time, CLOCKS[args.clock], args.compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
