"""How far the opt-in GPU decoding path (``--preprocess-device cuda``) is from the CPU path, and what it costs.

For each photo size: the CPU path's decode + preprocess ms per image, the device path's, the difference of the
model inputs (mean and max, in 8-bit intensity units and normalized units) and of the outputs of a peaked
random-weight DeiT (largest probability difference, top-1 / top-5 agreement).

On a CUDA machine with torchvision the device path is nvJPEG plus torch on the GPU (wall time, synchronized); on any
other machine Pillow's decoder stands in for nvJPEG and the device is the CPU, so the figures are those of the
arithmetic after the decode alone (resize, crop, normalize in torch against Pillow's).

    .venv/bin/python -m benchmarks.device_decoding --model tiny
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from benchmarks import assets
from benchmarks.jpeg_draft import median_ms, no_sync, output_agreement
from harness.inputs import pillow_decode
from service.errors import CheckpointError
from service.model.checkpoints import load_checkpoint
from service.model.decoding import decode_image, open_image
from service.model.device_decoding import Decode, DeviceDecoding, nvjpeg_decoder
from service.model.preprocessing import Preprocessor
from service.settings import Settings

MAX_PIXELS = Settings.model_fields["max_image_pixels"].default


def _cuda_sync() -> None:
    torch.cuda.synchronize()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", choices=sorted(assets.VARIANTS), default="tiny")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    checkpoint = load_checkpoint(assets.peaked_checkpoint(args.model), dtype="float32")
    cpu = Preprocessor(checkpoint.preprocess)
    decode: Decode = pillow_decode
    device, sync, decoder = torch.device("cpu"), no_sync, "Pillow on the CPU (no CUDA device)"
    if torch.cuda.is_available():
        try:
            decode, device = nvjpeg_decoder(torch.device("cuda")), torch.device("cuda")
            sync, decoder = _cuda_sync, "nvJPEG on " + torch.cuda.get_device_name()
        except CheckpointError as e:  # no torchvision: say so, measure the arithmetic alone
            decoder = f"Pillow on the CPU ({e})"
    on_device = DeviceDecoding(cpu, device, decode)
    print(f"device path: decoder {decoder}; model: peaked random-weight DeiT-{args.model}, float32 on the CPU\n")
    print(
        "| photos | CPU path ms | device path ms | input mean abs Δ (8-bit) | input max abs Δ (8-bit) "
        "| input max abs Δ (normalized) | output max abs Δ prob | top-1 same | top-5 same |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    scale = cpu.scales.view(3, 1, 1)
    for size in assets.IMAGE_SIZES:
        photos = assets.photos(size)

        def by_device(data: bytes) -> Tensor:
            pixels = on_device(open_image(data, MAX_PIXELS)[0], data)
            assert pixels is not None, "a baseline JPEG the device path refused"
            return pixels

        def on_cpu(data: bytes) -> Tensor:
            return cpu(decode_image(data, MAX_PIXELS))

        clock = time.perf_counter  # wall time: the device path's work is not this thread's CPU time
        cpu_ms = statistics.median(median_ms(functools.partial(on_cpu, d), args.repeats, clock) for d in photos)
        device_ms = statistics.median(
            median_ms(functools.partial(by_device, d), args.repeats, clock, sync) for d in photos
        )
        a = torch.stack([on_cpu(data) for data in photos])
        b = torch.stack([by_device(data).cpu() for data in photos])
        max_dp, top1, top5 = output_agreement(checkpoint.model, a, b)
        units = (a - b).abs() / scale
        n = len(photos)
        print(
            f"| {n} × {size} | {cpu_ms:.2f} | {device_ms:.2f} | {units.mean().item():.4f} | {units.max().item():.0f} "
            f"| {(a - b).abs().max().item():.3f} | {max_dp:.1e} | {top1}/{n} | {top5}/{n} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
