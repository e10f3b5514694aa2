"""The CPU anchor a user would reach for instead: ONNX Runtime, float32 and dynamically quantized int8.

What an Optimum user gets: transformers' model exported with ``torch.onnx.export`` (opset 17, dynamic batch) and
quantized with ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, uint8 activations, per tensor). Timed
forward-only in one process against ours as the service runs it (fused q/k/v; float32, ``--quantize int8``, and
bfloat16), same weights and threads, in rounds whose order rotates; the ratio is the median per-round ratio to
ours in float32. Agreement: top-1 and largest probability difference against ours in float32 on the six photos
and random inputs of the peaked random models, and held-out accuracy of the trained digits model.

    .venv/bin/python -m benchmarks.ort_anchor --sizes tiny,small --batches 1,16 --rounds 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks import assets
from benchmarks.quantization import DIGITS_MODEL, eval_inputs
from benchmarks.rounds import timed
from harness.inputs import training_script
from service.model.checkpoints import cpu_supports_bf16, load_checkpoint
from service.model.prepare import load_for_serving
from service.model.preprocessing import Preprocessor
from service.model.quantization import cpu_has_int8_dot_product

Forward = Callable[[Tensor], Tensor]


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).logits


def export_onnx(path: Path, directory: Path) -> tuple[Path, Path]:
    """transformers' model of ``path`` as ONNX float32 and its dynamic int8 quantization, in ``directory``."""
    import onnxruntime.quantization as ortq
    from transformers import DeiTForImageClassificationWithTeacher

    model = DeiTForImageClassificationWithTeacher.from_pretrained(path, attn_implementation="sdpa").eval()
    fp32, int8 = directory / "model.onnx", directory / "model.int8.onnx"
    h, w = load_checkpoint(path).preprocess.output_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            _Logits(model), (torch.zeros(1, 3, h, w),), str(fp32), input_names=["pixel_values"],
            output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17, dynamo=False,
        )  # fmt: skip
    ortq.quantize_dynamic(str(fp32), str(int8), weight_type=ortq.QuantType.QInt8)
    return fp32, int8


def ort_forward(model: Path, threads: int) -> Forward:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {"pixel_values": np.ascontiguousarray(x.numpy())})[0])

    return run


def ours_forward(path: Path, dtype: str, quantize: str) -> Forward:
    model = load_for_serving(path, device="cpu", dtype=dtype, quantize=quantize).model

    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x).float()

    return run


def contestants(path: Path, directory: Path, threads: int) -> dict[str, Forward]:
    fp32, int8 = export_onnx(path, directory)
    return {
        "ours fp32": ours_forward(path, "float32", "none"),
        "ours int8": ours_forward(path, "float32", "int8"),
        "ours bf16": ours_forward(path, "bfloat16", "none"),
        "ORT fp32": ort_forward(fp32, threads),
        "ORT int8": ort_forward(int8, threads),
    }


def agreement_cells(models: dict[str, Forward], inputs: Tensor) -> dict[str, str]:
    outputs = {n: torch.softmax(fn(inputs), dim=-1) for n, fn in models.items()}
    reference = outputs[next(iter(models))]
    return {
        n: f"{int((p.argmax(-1) == reference.argmax(-1)).sum())}/{len(inputs)}, {(p - reference).abs().max():.3f}"
        for n, p in outputs.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=lambda s: [x for x in s.split(",") if x], default=["tiny", "small"])
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-time", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    print(
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads, "
        f"native bf16: {cpu_supports_bf16()}, int8 dot product: {cpu_has_int8_dot_product()}; "
        f"{args.rounds} rotating rounds × ~{args.round_time:g}s; ratio = ours fp32 time / its time"
    )
    names = ["ours fp32", "ours int8", "ours bf16", "ORT fp32", "ORT int8"]
    print("| model | batch | " + " | ".join(f"{n} img/s (ratio)" for n in names) + " |")
    print("|---|--:|" + "--:|" * len(names))
    agreements: list[str] = []
    with tempfile.TemporaryDirectory(prefix="deit-ort-") as tmp:
        train = training_script()
        models = contestants(DIGITS_MODEL, Path(tmp), args.threads)
        inputs, labels = train.held_out_inputs(
            train.held_out_split(), Preprocessor(load_checkpoint(DIGITS_MODEL).preprocess)
        )
        accuracy = {
            n: f"{100 * float((fn(inputs).argmax(-1) == labels).float().mean()):.2f}%" for n, fn in models.items()
        }
        agreements.append("| digits (trained), held-out accuracy | " + " | ".join(accuracy[n] for n in names) + " |")
        for size in args.sizes:
            path = assets.peaked_checkpoint(size)
            directory = Path(tmp) / size
            directory.mkdir()
            models = contestants(path, directory, args.threads)
            cells = agreement_cells(models, eval_inputs(load_checkpoint(path)))
            agreements.append(
                f"| {size}, top-1 agree / max abs dp vs ours fp32 | " + " | ".join(cells[n] for n in names) + " |"
            )
            for batch in args.batches:
                x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
                result = timed(models, x, len(x), args.rounds, args.round_time, same_iterations=True)
                row = [f"{result[n][0]:.1f} ({result[n][1]:.2f})" for n in names]
                print(f"| {size} | {batch} | " + " | ".join(row) + " |", flush=True)
            del models
    print("\n| accuracy | " + " | ".join(names) + " |")
    print("|---|" + "--:|" * len(names))
    print("\n".join(agreements))
    return 0


if __name__ == "__main__":
    sys.exit(main())
