"""Dynamic int8 for the encoder's Linear layers on CPU: int8 weights, activations quantized per batch at run time.

``torch.ao.quantization.quantize_dynamic`` (fbgemm / x86 kernels, VNNI where the CPU has it) rather than torchao:
torchao 0.18's int8 dynamic path is built for ``torch.compile``; in eager mode on CPU it ran at half the float32
speed where this one ran at 1.4× (benchmarks/README.md).
"""

from __future__ import annotations

import gc
import re
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from service.model.deit import DeiT

Quantize = Literal["none", "int8"]
# Engines with dynamic int8 Linear kernels on x86 / ARM CPUs.
_INT8_ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")


def cpu_has_int8_dot_product() -> bool:
    """True where the CPU multiplies int8 natively (AVX512-VNNI, AVX-VNNI or AMX-INT8); elsewhere int8 still runs
    on AVX2, with a smaller gain."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_vnni|avx_vnni|amx_int8)\b", flags))


def int8_engine() -> str | None:
    """The quantized engine this torch build offers for dynamic int8 Linear on CPU, or None."""
    supported = torch.backends.quantized.supported_engines
    return next((e for e in _INT8_ENGINES if e in supported), None)


def quantize_int8(model: DeiT) -> DeiT:
    """Replace the encoder's Linear layers (attention and MLP) by dynamic int8 ones, in place.

    The classifier heads, patch embedding and LayerNorms stay float32: they are a small share of the work and
    carry most of the accuracy risk.
    """
    if next(model.parameters()).dtype != torch.float32 or next(model.parameters()).device.type != "cpu":
        raise ValueError("dynamic int8 quantization needs a float32 model on the CPU")
    engine = int8_engine()
    if engine is None:
        raise ValueError("this torch build has no quantized CPU engine for int8")
    torch.backends.quantized.engine = engine
    # Every float32 tensor that outlives quantization (biases, which the int8 layers keep; embeddings, norms, heads)
    # may be a view of the memory-mapped checkpoint file, which then stays mapped, its pages resident, for their
    # sake: own copies of them let the mapping go once the float32 Linear weights are replaced.
    replaced = {id(m.weight) for m in model.backbone.encoder.modules() if isinstance(m, nn.Linear)}
    for param in model.parameters():
        if id(param) not in replaced:
            param.data = param.data.clone()
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the eager dynamic path still works as documented.
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            model.backbone.encoder, {nn.Linear}, dtype=torch.qint8, inplace=True
        )
    gc.collect()  # the replaced float32 Linears sit in reference cycles; collecting them unmaps the file now
    return model


def is_int8(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())
