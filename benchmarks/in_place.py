"""The serving forward (in place, one scratch buffer) against the plain allocating forward, side by side.

Both run the same fused float32 (or native bf16) model on the same batch: the plain forward is what autograd and
the exporters see (``torch.no_grad``), the serving one is what the engine runs (``torch.inference_mode``: GELU,
residual adds and layer scale in place, q/k/v and the MLP's hidden layer in one scratch buffer per forward). Timed in
rotating rounds; the ratio is the median per-round ratio of the plain forward's time to the serving one's. Page
faults per forward are counted around one extra pass of each (``getrusage``).

The third contestant is the floor of any pure-PyTorch forward that keeps torch's kernels: the same model's GEMMs
(patch embedding, q/k/v, attention output, both MLP Linears, the heads) and its SDPA calls alone, on preallocated
inputs and outputs, back to back. ``floor ÷ serving`` is how much faster than the serving forward any rewrite of
the rest (copies, LayerNorm, GELU, adds, Python) could make it: the headroom left without faster GEMMs.

    .venv/bin/python -m benchmarks.in_place --sizes tiny,small,base --batches 1,16 --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import re
import resource
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from benchmarks import assets
from benchmarks.rounds import timed
from service.model.checkpoints import cpu_supports_bf16, load_checkpoint
from service.model.deit import DeiT


def page_faults(forward: Callable[[Tensor], object], x: Tensor) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    forward(x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def kernels_alone(model: DeiT, batch: int, dtype: torch.dtype) -> Callable[[Tensor], object]:
    """The model's GEMMs and SDPA calls at its shapes for ``batch`` images, nothing else (see the docstring)."""
    config = model.config
    d, heads, hidden = config.hidden_size, config.num_attention_heads, config.intermediate_size
    patches = (224 // config.patch_size) ** 2
    tokens = patches + config.num_prefix_tokens
    rows = batch * tokens

    def gemm(m: int, k: int, n: int) -> Callable[[], object]:
        a, w, bias, out = (
            torch.randn(m, k, dtype=dtype),
            torch.randn(n, k, dtype=dtype),
            torch.randn(n, dtype=dtype),
            torch.empty(m, n, dtype=dtype),
        )
        return lambda: torch.addmm(bias, a, w.t(), out=out)

    q, k, v = (torch.randn(batch, heads, tokens, d // heads, dtype=dtype) for _ in range(3))
    per_layer = [gemm(rows, d, 3 * d), lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                 gemm(rows, d, d), gemm(rows, d, hidden), gemm(rows, hidden, d)]  # fmt: skip
    calls = [gemm(batch * patches, 3 * config.patch_size**2, d)] + per_layer * config.num_hidden_layers
    calls.append(gemm(batch, d, config.num_labels * (2 if config.has_distillation_token else 1)))

    def run(_: Tensor) -> object:
        with torch.inference_mode():
            for call in calls:
                call()
        return None

    return run


def contestants(model: DeiT) -> dict[str, Callable[[Tensor], object]]:
    def plain(x: Tensor) -> object:
        with torch.no_grad():
            return model(x)

    def serving(x: Tensor) -> object:
        with torch.inference_mode():
            return model(x)

    return {"plain": plain, "serving": serving}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=lambda s: [x for x in s.split(",") if x], default=["tiny", "small", "base"])
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-time", type=float, default=1.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    flags = re.findall(r"\b(avx2|avx512f|avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text())
    print(f"torch {torch.__version__}; {args.threads} threads; CPU flags: {' '.join(sorted(set(flags)))}")
    dtypes = [torch.float32, *([torch.bfloat16] if cpu_supports_bf16() else [])]
    print(
        "\n| model | dtype | batch | plain img/s | serving img/s | serving ÷ plain | page faults plain → serving "
        "| GEMMs + SDPA alone img/s | floor ÷ serving |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for size in args.sizes:
        for dtype in dtypes:
            model = load_checkpoint(assets.checkpoint(size), dtype=dtype).model.fuse_attention_projections()
            for batch in args.batches:
                x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch)).to(dtype)
                forwards = contestants(model)
                result = timed({**forwards, "floor": kernels_alone(model, batch, dtype)}, x, batch, args.rounds,
                               args.round_time)  # fmt: skip
                faults = {name: page_faults(forward, x) for name, forward in forwards.items()}
                print(
                    f"| {size} | {str(dtype).removeprefix('torch.')} | {batch} | {result['plain'][0]:.1f} | "
                    f"{result['serving'][0]:.1f} | {result['serving'][1]:.2f}× | "
                    f"{faults['plain']} → {faults['serving']} | {result['floor'][0]:.1f} | "
                    f"{result['floor'][1] / result['serving'][1]:.2f}× |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
