"""Eager torch: our own module, as loaded (the CUDA path, CUDA graphs and dynamic int8 included); the other
precisions a measurement compares are copies of the float32 module."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from service.engine.runner import Forward, checkpoint_forward
from service.engine.runtimes import BFLOAT16, FLOAT16, FLOAT32, INT8
from service.model.checkpoints import LoadedCheckpoint
from service.model.quantization import is_int8, quantize_int8

_DTYPES = {FLOAT32: torch.float32, BFLOAT16: torch.bfloat16, FLOAT16: torch.float16}


def precision_of(checkpoint: LoadedCheckpoint) -> str:
    return INT8 if is_int8(checkpoint.model) else str(checkpoint.dtype).removeprefix("torch.")


def build(checkpoint: LoadedCheckpoint, precision: str) -> Forward:
    """The forward pass at ``precision``: the loaded module itself when it already is, else a converted copy of
    the float32 one."""
    if precision == precision_of(checkpoint):
        return checkpoint_forward(checkpoint)
    model = copy.deepcopy(checkpoint.model)
    if precision == INT8:
        return checkpoint_forward(replace(checkpoint, model=quantize_int8(model)))
    dtype = _DTYPES[precision]
    return checkpoint_forward(replace(checkpoint, model=model.to(dtype), dtype=dtype))
