"""The runtimes behind the engine side by side: forward-only img/s of each runtime × precision on the same weights,
with agreement and held-out accuracy, and (``--profile``) where the time of our torch forward goes, per op.

Each contestant is what the service serves for ``--runtime X --dtype/--quantize Y`` (built by the same code:
``service.engine.runtimes``), fed the same stacked batch; bf16 only where the CPU has it natively; int8 is each
runtime's own (torch and ONNX Runtime dynamic quantization, OpenVINO NNCF int8 weight compression). Timed in rounds
whose order rotates; the ratio is the median per-round ratio of torch float32's time to its time. Agreement: top-1
equal / max |Δp| against torch float32 on the six photos and random inputs of the peaked random models; accuracy:
the held-out split of the embedded trained digits model.

    .venv/bin/python -m benchmarks.runtimes --sizes tiny,small,base --batch 16 --threads 2 --rounds 3
    .venv/bin/python -m benchmarks.runtimes --profile --sizes tiny,small,base --batch 16
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from benchmarks import assets
from benchmarks.quantization import DIGITS_MODEL, eval_inputs
from benchmarks.rounds import timed
from harness.inputs import training_script
from service.engine.runner import Forward
from service.engine.runtimes import BFLOAT16, FLOAT32, RuntimeUnavailable, output_names
from service.engine.runtimes import eager as torch_runtime
from service.engine.runtimes import onnxruntime as ort_runtime
from service.engine.runtimes import openvino as ov_runtime
from service.engine.runtimes.cache import ArtefactCache, model_digest
from service.model.checkpoints import LoadedCheckpoint, cpu_supports_bf16, load_checkpoint
from service.model.pooling import LOGITS
from service.model.prepare import load_for_serving
from service.model.preprocessing import Preprocessor
from service.model.quantization import cpu_has_int8_dot_product


def contestant_names() -> list[str]:
    bf16 = cpu_supports_bf16()
    names = ["torch float32", "torch int8", *(["torch bfloat16"] if bf16 else [])]
    names += ["openvino float32", *(["openvino bfloat16"] if bf16 else []), "openvino int8"]
    names += ["onnxruntime float32", "onnxruntime int8"]
    return names


def contestants(checkpoint: LoadedCheckpoint, threads: int, cache: ArtefactCache) -> dict[str, Forward]:
    """Every runtime × precision this machine serves, from the one float32 module (exports read ``cache``)."""
    shape = (checkpoint.config.num_channels, *checkpoint.preprocess.output_size)
    names, digest = output_names(checkpoint.model, shape), model_digest(checkpoint.model)
    out: dict[str, Forward] = {}
    for name in contestant_names():
        runtime, precision = name.split()
        if runtime == "torch":
            out[name] = torch_runtime.build(checkpoint, precision)
            continue
        builder = ov_runtime.build if runtime == "openvino" else ort_runtime.build
        try:
            out[name] = builder(checkpoint.model, names, shape, digest=digest, precision=precision,
                                threads=threads, streams=1, cache=cache)  # fmt: skip
        except RuntimeUnavailable as e:
            print(f"# {name} skipped: {e}", file=sys.stderr)
    return out


def probabilities(forward: Forward, inputs: Tensor) -> Tensor:
    return torch.cat([forward(list(inputs[i : i + 16]))[LOGITS].softmax(-1) for i in range(0, len(inputs), 16)])


def agreement(models: dict[str, Forward], inputs: Tensor) -> dict[str, str]:
    outputs = {n: probabilities(f, inputs) for n, f in models.items()}
    ref = outputs["torch float32"]
    return {
        n: f"{int((p.argmax(-1) == ref.argmax(-1)).sum())}/{len(inputs)}, {float((p - ref).abs().max()):.1e}"
        for n, p in outputs.items()
    }


# --- where the time goes: torch.profiler per op, grouped --------------------------------------------------------

GROUPS = [
    ("GEMM", r"addmm|::mm$|bmm|matmul|linear|conv|mkldnn"),
    ("attention", r"scaled_dot_product|flash_attention|softmax"),
    ("LayerNorm", r"layer_norm"),
    ("GELU", r"gelu"),
    (
        "copies/reshapes",
        r"copy|clone|contiguous|cat$|stack|permute|transpose|view|reshape|expand|_to_copy|::to$"
        r"|empty|unbind|select|slice|as_strided|unsqueeze|flatten|split|chunk|t$",
    ),
    ("elementwise", r"add|mul|div|sub|mean|tanh"),
]


def profile(checkpoint: LoadedCheckpoint, dtype: str, batch: list[Tensor]) -> tuple[float, dict[str, float], str]:
    """ms per forward, each group's share of self CPU time, and the top ops."""
    forward = torch_runtime.build(checkpoint, dtype)
    forward(batch)
    iters = 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            forward(batch)
    events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1.0
    shares = dict.fromkeys([g for g, _ in GROUPS] + ["other"], 0.0)
    for key, t in events:
        group = next((g for g, pattern in GROUPS if re.search(pattern, key)), "other")
        shares[group] += 100 * t / total
    top = sorted(events, key=lambda e: -e[1])[:5]
    tops = ", ".join(f"{k.removeprefix('aten::')} {100 * t / total:.0f}%" for k, t in top)
    return total / iters / 1000, shares, tops


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=lambda s: [x for x in s.split(",") if x], default=["tiny", "small", "base"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-time", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every runtime")
    parser.add_argument("--profile", action="store_true", help="the per-op table of our torch forward instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    flags = re.findall(r"\b(avx2|avx512f|avx512_bf16|avx512_vnni|avx_vnni|amx_bf16|amx_int8)\b",
                       Path("/proc/cpuinfo").read_text())  # fmt: skip
    versions = f"torch {torch.__version__}"
    for name, module in (("openvino", ov_runtime), ("onnxruntime", ort_runtime)):
        try:
            versions += f", {name} {module.version()}"
        except RuntimeUnavailable:
            versions += f", no {name}"
    print(f"{versions}; {args.threads} threads; CPU flags: {' '.join(sorted(set(flags)))}; native bf16: "
          f"{cpu_supports_bf16()}, int8 dot product: {cpu_has_int8_dot_product()}")  # fmt: skip
    if args.profile:
        dtypes = [FLOAT32, *([BFLOAT16] if cpu_supports_bf16() else [])]
        groups = [g for g, _ in GROUPS] + ["other"]
        print(f"\nSelf CPU time per op group of our torch forward, batch {args.batch}, {args.threads} threads\n")
        print("| model | dtype | ms/forward | " + " | ".join(groups) + " | top ops |")
        print("|---|---|--:|" + "--:|" * len(groups) + "---|")
        for size in args.sizes:
            checkpoint = load_for_serving(assets.checkpoint(size), device="cpu", dtype="float32")
            batch = list(torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
            for dtype in dtypes:
                ms, shares, tops = profile(checkpoint, dtype, batch)
                cells = " | ".join(f"{shares[g]:.0f}%" for g in groups)
                print(f"| {size} | {dtype} | {ms:.0f} | {cells} | {tops} |", flush=True)
        return 0
    names = contestant_names()
    print(f"\nForward only, batch {args.batch}: img/s (× torch float32), {args.rounds} rotating rounds of "
          f"~{args.round_time:g} s\n")  # fmt: skip
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "--:|" * len(names))
    agreements: list[str] = []
    with tempfile.TemporaryDirectory(prefix="deit-runtimes-") as tmp:
        cache = ArtefactCache(Path(tmp))
        train = training_script()
        digits = load_for_serving(DIGITS_MODEL, device="cpu", dtype="float32")
        inputs, labels = train.held_out_inputs(
            train.held_out_split(), Preprocessor(load_checkpoint(DIGITS_MODEL).preprocess)
        )
        models = contestants(digits, args.threads, cache)
        accuracy = {
            n: 100 * float((probabilities(f, inputs).argmax(-1) == labels).float().mean()) for n, f in models.items()
        }
        agreements.append("| digits (trained), held-out accuracy | " + " | ".join(
            f"{accuracy[n]:.2f}%" if n in accuracy else "—" for n in names) + " |")  # fmt: skip
        del models
        for size in args.sizes:
            checkpoint = load_for_serving(assets.peaked_checkpoint(size), device="cpu", dtype="float32")
            models = contestants(checkpoint, args.threads, cache)
            agree = agreement(models, eval_inputs(checkpoint))
            agreements.append(f"| {size}: top-1 agree, max abs Δp vs torch float32 | " + " | ".join(
                agree.get(n, "—") for n in names) + " |")  # fmt: skip
            batch = list(torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(args.batch)))
            result = timed(models, batch, len(batch), args.rounds, args.round_time)
            row = [f"{result[n][0]:.1f} ({result[n][1]:.2f}×)" if n in result else "—" for n in names]
            print(f"| {size} | " + " | ".join(row) + " |", flush=True)
            del models, checkpoint
    print("\n| agreement | " + " | ".join(names) + " |")
    print("|---|" + "--:|" * len(names))
    print("\n".join(agreements))
    return 0


if __name__ == "__main__":
    sys.exit(main())
