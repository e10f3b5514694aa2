"""OpenVINO's forward alone on the same weights: the ceiling an OpenVINO Model Server would be held to on these cores.

The model is exported by the service's own code (``service.engine.runtimes.openvino``) at OpenVINO's default
precision on this CPU (bf16 where the CPU has it natively, float32 otherwise), compiled with every core as its
threads, and fed batches of preprocessed images back to back: no decoding, no HTTP, no queue. ``benchmarks/e2e.py``
runs it in a child process and holds the service's end-to-end img/s against it.

    .venv/bin/python -m benchmarks.runtime_ceiling --model small --batch 16 --seconds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import assets
from service.engine.runtimes import BFLOAT16, FLOAT32, RuntimeUnavailable, output_names
from service.engine.runtimes import openvino as ov_runtime
from service.engine.runtimes.cache import ArtefactCache, model_digest
from service.model.checkpoints import cpu_supports_bf16
from service.model.prepare import load_for_serving


def measure(model: str, batch: int, seconds: float, threads: int) -> dict[str, float | str]:
    """img/s of OpenVINO's forward at its default precision; raises RuntimeUnavailable without OpenVINO."""
    precision = BFLOAT16 if cpu_supports_bf16() else FLOAT32
    checkpoint = load_for_serving(assets.checkpoint(model), device="cpu", dtype="float32")
    shape = (checkpoint.config.num_channels, *checkpoint.preprocess.output_size)
    with tempfile.TemporaryDirectory(prefix="deit-ceiling-") as tmp:
        forward = ov_runtime.build(
            checkpoint.model, output_names(checkpoint.model, shape), shape, digest=model_digest(checkpoint.model),
            precision=precision, threads=threads, streams=1, cache=ArtefactCache(Path(tmp)),
        )  # fmt: skip
        images = list(torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)))
        forward(images)
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            forward(images)
            done += batch
    return {"runtime": f"openvino {ov_runtime.version()}", "precision": precision, "img_s": done / elapsed}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        result = measure(args.model, args.batch, args.seconds, args.threads)
    except RuntimeUnavailable as e:
        print(f"# no OpenVINO ceiling: {e}", file=sys.stderr)
        return 3
    print(f"OpenVINO forward alone, {args.model} batch {args.batch}, {args.threads} threads, {result['precision']}: "
          f"{result['img_s']:.1f} img/s")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
