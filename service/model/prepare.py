"""The model as served: loaded, q/k/v fused, then optionally dynamic int8 (CPU) or CUDA-graphed (GPU)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from service.errors import CheckpointError
from service.model.checkpoints import LoadedCheckpoint, load_checkpoint, resolve_device
from service.model.cuda_graphs import GraphedModel, bucket_sizes
from service.model.quantization import quantize_int8
from service.settings import Settings


def load_for_serving(path: Path, settings: Settings) -> LoadedCheckpoint:
    """``load_checkpoint`` with the serving settings' speed-ups applied; int8 loads float32 weights first."""
    device = resolve_device(settings.device)
    dtype = settings.dtype
    if settings.quantize == "int8":
        if device.type != "cpu":
            raise CheckpointError(f"--quantize int8 runs on the CPU only; the device is {device}")
        dtype = "float32"  # int8 weights, float32 activations between the quantized layers (settings refuse bf16)
    if settings.cuda_graphs and device.type != "cuda":
        raise CheckpointError(f"--cuda-graphs needs a CUDA device; the device is {device}")
    checkpoint = load_checkpoint(path, device=device, dtype=dtype)
    model = checkpoint.model.fuse_attention_projections()
    if settings.quantize == "int8":
        model = quantize_int8(model)
    if device.type == "cuda":
        # Loading and fusing queued copies on the default stream; forward and decoding threads run on streams of
        # their own that are not ordered after it.
        torch.cuda.synchronize(device)
    if settings.cuda_graphs:
        h, w = checkpoint.preprocess.output_size
        image_shape = (checkpoint.config.num_channels, h, w)
        graphed = GraphedModel(model, bucket_sizes(settings.max_batch_size), image_shape, checkpoint.dtype, device)
        return replace(checkpoint, model=graphed)  # type: ignore[arg-type]
    return replace(checkpoint, model=model)
