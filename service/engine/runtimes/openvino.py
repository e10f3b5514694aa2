"""OpenVINO: the module converted with ``openvino.convert_model`` (dynamic batch), saved as IR in the artefact
cache, compiled for the CPU at the precision asked for (bf16 only where the CPU has it natively) on the service's
threads. Each forward thread keeps its own infer request."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.engine.runner import Forward, Outputs
from service.engine.runtimes import (
    BFLOAT16,
    EXPORT_VERSION,
    FLOAT32,
    OPENVINO,
    OutputsModule,
    RuntimeUnavailable,
    installed_version,
    stack,
)
from service.engine.runtimes.cache import ArtefactCache, entry_key
from service.model.deit import DeiT

_PRECISIONS = {FLOAT32: "f32", BFLOAT16: "bf16"}


def version() -> str:
    return installed_version("openvino")


def build(
    model: DeiT,
    names: Sequence[str],
    image_shape: tuple[int, int, int],
    *,
    digest: str,
    precision: str,
    threads: int,
    streams: int,
    cache: ArtefactCache,
) -> Forward:
    """Export (or read from the cache) and compile; raises RuntimeUnavailable on any failure, with its cause."""
    ov_version = version()
    if precision not in _PRECISIONS:
        raise RuntimeUnavailable(f"OpenVINO serves float32 or bfloat16 on the CPU, not {precision}")
    try:
        import openvino as ov
    except ImportError as e:
        raise RuntimeUnavailable(f"openvino does not import: {e}") from e

    def export(directory: Path) -> list[str]:
        wrapper = OutputsModule(model, names).eval()
        # Tracing warns of shape-dependent Python values; the batch dimension is made dynamic below.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = ov.convert_model(wrapper, example_input=torch.zeros((2, *image_shape)))
        converted.reshape({converted.inputs[0]: ov.PartialShape([-1, *image_shape])})
        for port, name in zip(converted.outputs, names, strict=True):
            port.get_tensor().set_names({name})
        ov.save_model(converted, directory / "model.xml", compress_to_fp16=False)
        return ["model.xml", "model.bin"]

    key = entry_key(digest, OPENVINO, ov_version, EXPORT_VERSION, ",".join(names))
    try:
        entry = cache.get_or_build(key, export, f"openvino {ov_version}")
    except Exception as e:
        raise RuntimeUnavailable(f"OpenVINO export failed: {type(e).__name__}: {e}") from e
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": _PRECISIONS[precision],
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": streams,
        "ENABLE_CPU_PINNING": False,  # the cores are shared with decoding threads
    }
    try:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(entry / "model.xml"), "CPU", config)
    except Exception as e:
        cache.discard(entry)  # verified bytes that do not compile: the next start exports afresh
        raise RuntimeUnavailable(f"OpenVINO could not compile {entry}: {type(e).__name__}: {e}") from e
    local = threading.local()

    def forward(pixels: Sequence[Tensor]) -> Outputs:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        request.infer({0: stack(pixels).numpy()})
        return {name: torch.from_numpy(np.array(request.get_output_tensor(i).data, dtype=np.float32))
                for i, name in enumerate(names)}  # fmt: skip

    return forward
