"""Dynamic int8 (``--quantize int8``) against float32: accuracy, agreement, and the loaded model's memory.

* The embedded trained model (``service/data/model_store/deit-tiny-digits``): held-out accuracy on scikit-learn's
  digits (the split ``scripts/train_default_model.py`` trains on) of the CLS head, the distillation head and their
  average.
* Random-weight DeiT tiny / small / base (transformers' standard sizes) with "peaked" heads
  (``assets.peaked_checkpoint``): top-1 agreement with float32 and the largest probability difference, on the six
  photos (640×480 JPEGs through the service's preprocessing) and on random inputs.
* RSS: resident memory of a fresh process after loading the model for serving, minus its RSS before loading.

    .venv/bin/python -m benchmarks.quantization                      # all of it
    .venv/bin/python -m benchmarks.quantization --sizes tiny --no-rss
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks import assets
from harness.inputs import training_script
from service.model.checkpoints import LoadedCheckpoint
from service.model.decoding import decode_image
from service.model.deit import DeiT
from service.model.prepare import load_for_serving
from service.model.preprocessing import Preprocessor
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DIGITS_MODEL = REPO / "service" / "data" / "model_store" / "deit-tiny-digits"
MAX_PIXELS = Settings.model_fields["max_image_pixels"].default
RANDOM_INPUTS = 58  # with the six photos: 64 images per model


@dataclass(frozen=True)
class Agreement:
    images: int
    top1_agree: int
    max_prob_diff: float
    mean_top_prob: float  # float32's, to show how peaked the answers are


def load(path: Path, quantize: str) -> LoadedCheckpoint:
    """The model exactly as the service prepares it (fused q/k/v; int8 when asked), float32."""
    return load_for_serving(path, device="cpu", dtype="float32", quantize=quantize)


def agreement(reference: nn.Module, candidate: nn.Module, inputs: Tensor) -> Agreement:
    with torch.inference_mode():
        p = torch.softmax(reference(inputs).float(), dim=-1)
        q = torch.softmax(candidate(inputs).float(), dim=-1)
    agree = int((p.argmax(-1) == q.argmax(-1)).sum())
    return Agreement(len(inputs), agree, (p - q).abs().max().item(), p.max(-1).values.mean().item())


def eval_inputs(checkpoint: LoadedCheckpoint, count: int = RANDOM_INPUTS) -> Tensor:
    """The six photos through the service's preprocessing, then ``count`` standard-normal images."""
    preprocessor = Preprocessor(checkpoint.preprocess)
    photos = [preprocessor(decode_image(data, MAX_PIXELS)) for data in assets.photos("640x480")]
    h, w = checkpoint.preprocess.output_size
    noise = torch.randn(count, 3, h, w, generator=torch.Generator().manual_seed(0))
    return torch.cat([torch.stack(photos), noise])


def digits_accuracy() -> dict[str, dict[str, str]]:
    """Held-out accuracy per head, float32 and int8, of the embedded trained model."""
    train = training_script()
    split = train.held_out_split()
    results: dict[str, dict[str, str]] = {}
    for quantize in ("none", "int8"):
        checkpoint = load(DIGITS_MODEL, quantize)
        inputs, labels = train.held_out_inputs(split, Preprocessor(checkpoint.preprocess))
        model = checkpoint.model
        assert isinstance(model, DeiT)
        with torch.inference_mode():
            scores = train.evaluate_student(model, inputs, labels)
        results[quantize] = {head: str(acc) for head, acc in scores.items()}
    return results


_RSS_PROBE = """
import json, sys
from pathlib import Path
import torch
from benchmarks.quantization import load
def status():
    fields = dict(line.split(':', 1) for line in Path('/proc/self/status').read_text().splitlines())
    return {k: int(fields[k].split()[0]) / 1024 for k in ('VmRSS', 'RssAnon', 'RssFile')}
torch.set_num_threads(1)
before = status()
checkpoint = load(Path(sys.argv[1]), sys.argv[2])
h, w = checkpoint.preprocess.output_size
with torch.inference_mode():
    checkpoint.model(torch.zeros(1, 3, h, w))
after = status()
print(json.dumps({k: after[k] - before[k] for k in after}))
"""


def loaded_rss_mib(path: Path, quantize: str) -> dict[str, float]:
    """Growth of a fresh process's RSS (total, anonymous, file-backed) from before loading the model for serving
    to after its first forward pass (batch 1, as warm-up leaves it)."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(path), quantize], check=True, capture_output=True, text=True, cwd=REPO
    ).stdout
    return {k: float(v) for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=lambda s: [x for x in s.split(",") if x], default=list(assets.VARIANTS))
    parser.add_argument("--scale", type=float, default=40.0, help="factor on the random models' head weights")
    parser.add_argument("--no-rss", action="store_true", help="skip the memory measurement")
    parser.add_argument("--only-rss", action="store_true", help="only the memory measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows: list[tuple[str, str, str, str, str]] = []
    digits = {} if args.only_rss else digits_accuracy()
    for head in () if args.only_rss else ("cls", "distillation", "average"):
        accuracy = (digits["none"][head], digits["int8"][head])
        rows.append((f"digits (trained), {head} head", "held-out accuracy", *accuracy, ""))
    rss_models = [("digits", DIGITS_MODEL)]
    for size in args.sizes:
        path = assets.peaked_checkpoint(size, args.scale)
        rss_models.append((size, path))
        if args.only_rss:
            continue
        fp32, int8 = load(path, "none"), load(path, "int8")
        inputs = eval_inputs(fp32)
        for label, part in (("6 photos", inputs[:6]), (f"{RANDOM_INPUTS} random inputs", inputs[6:])):
            a = agreement(fp32.model, int8.model, part)
            rows.append((
                f"{size} (random, peaked ×{args.scale:g}), {label}", "top-1 agreement / max |Δp|",
                f"mean top p {a.mean_top_prob:.2f}", f"{a.top1_agree}/{a.images}", f"{a.max_prob_diff:.3f}",
            ))  # fmt: skip
        del fp32, int8
    if not args.no_rss:
        for name, path in rss_models:
            none, int8_mib = loaded_rss_mib(path, "none"), loaded_rss_mib(path, "int8")
            for key, label in (("VmRSS", "RSS"), ("RssAnon", "anonymous"), ("RssFile", "file-backed")):
                ratio = f"{int8_mib[key] / none[key]:.2f}×" if none[key] > 0.5 else ""
                cells = (f"{none[key]:.1f}", f"{int8_mib[key]:.1f}", ratio)
                rows.append((name, f"{label} memory after loading + 1 forward (MiB)", *cells))

    print(f"torch {torch.__version__}, quantized engine {torch.backends.quantized.engine}")
    print("| model / inputs | measure | float32 | int8 | Δ / ratio |")
    print("|---|---|--:|--:|--:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
