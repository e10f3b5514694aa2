"""The model as served: loaded, q/k/v fused, then optionally dynamic int8 (CPU) or CUDA-graphed (GPU)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from service.errors import CheckpointError
from service.model.checkpoints import LoadedCheckpoint, load_checkpoint, resolve_device
from service.model.cuda_graphs import GraphedModel, bucket_sizes
from service.model.quantization import quantize_int8


def load_for_serving(
    path: Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "none",
    cuda_graphs: bool = False,
    max_batch_size: int = 32,
) -> LoadedCheckpoint:
    """``load_checkpoint`` with the serving speed-ups applied; int8 loads float32 weights first.

    ``cuda_graphs`` captures one graph per batch-size bucket up to ``max_batch_size``."""
    resolved = resolve_device(device)
    if quantize == "int8":
        if resolved.type != "cpu":
            raise CheckpointError(f"--quantize int8 runs on the CPU only; the device is {resolved}")
        dtype = "float32"  # int8 weights, float32 activations between the quantized layers (settings refuse bf16)
    if cuda_graphs and resolved.type != "cuda":
        raise CheckpointError(f"--cuda-graphs needs a CUDA device; the device is {resolved}")
    checkpoint = load_checkpoint(path, device=resolved, dtype=dtype)
    model = checkpoint.model.fuse_attention_projections()
    if quantize == "int8":
        model = quantize_int8(model)
    if resolved.type == "cuda":
        # Loading and fusing queued copies on the default stream; forward and decoding threads run on streams of
        # their own that are not ordered after it.
        torch.cuda.synchronize(resolved)
    if cuda_graphs:
        h, w = checkpoint.preprocess.output_size
        image_shape = (checkpoint.config.num_channels, h, w)
        graphed = GraphedModel(model, bucket_sizes(max_batch_size), image_shape, checkpoint.dtype, resolved)
        return replace(checkpoint, model=graphed)  # type: ignore[arg-type]
    return replace(checkpoint, model=model)
