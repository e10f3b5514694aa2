"""ONNX Runtime: the module exported with ``torch.onnx.export`` (dynamic batch) into the artefact cache, run by
one CPU session on the service's threads; int8 is the session over ONNX Runtime's dynamic quantization of it."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from service.engine.runner import Forward, Outputs
from service.engine.runtimes import (
    EXPORT_VERSION,
    FLOAT32,
    INPUT_NAME,
    INT8,
    ONNXRUNTIME,
    OutputsModule,
    RuntimeUnavailable,
    installed_version,
    shape_key,
    stack,
)
from service.engine.runtimes.cache import ArtefactCache, entry_key
from service.model.deit import DeiT

OPSET = 17
_QUANTIZING = threading.Lock()  # one at a time: the quantizer's log filter is on the process's root logger


def version() -> str:
    return installed_version("onnxruntime")


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
    """Export (or read from the cache) and open a session; raises RuntimeUnavailable on any failure."""
    ort_version = version()
    if precision not in (FLOAT32, INT8):
        raise RuntimeUnavailable(f"ONNX Runtime serves float32 or int8 on the CPU, not {precision}")
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeUnavailable(f"onnxruntime does not import: {e}") from e
    ort.disable_telemetry_events()  # ONNX Runtime's own usage events: a server sends none

    def export(directory: Path) -> list[str]:
        wrapper = OutputsModule(model, names).eval()
        axes = {name: {0: "batch"} for name in (INPUT_NAME, *names)}
        # Tracing warns of shape-dependent Python values (the batch is a dynamic axis) and, for ONNX, that the
        # TorchScript exporter is the older one: it is the one that needs no onnxscript.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (torch.zeros((2, *image_shape)),),
                str(directory / "model.onnx"),
                input_names=[INPUT_NAME],
                output_names=list(names),
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
        if precision == INT8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with _quantizer_quiet(Path(ort.__file__).parent):
                quantize_dynamic(directory / "model.onnx", directory / "model.int8.onnx", weight_type=QuantType.QInt8)
            (directory / "model.onnx").unlink()
            return ["model.int8.onnx"]
        return ["model.onnx"]

    key = entry_key(
        digest,
        ONNXRUNTIME,
        ort_version,
        torch.__version__,
        EXPORT_VERSION,
        precision,
        ",".join(names),
        shape_key(image_shape),
    )
    try:
        entry = cache.get_or_build(key, export, f"onnxruntime {ort_version} {precision}")
    except Exception as e:
        raise RuntimeUnavailable(f"ONNX export failed: {type(e).__name__}: {e}") from e
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No spin-waiting between passes: the cores are shared with the decoding threads (as torch's OpenMP policy).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    path = entry / ("model.int8.onnx" if precision == INT8 else "model.onnx")
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:
        cache.discard(entry)
        raise RuntimeUnavailable(f"ONNX Runtime could not load {path}: {type(e).__name__}: {e}") from e
    wanted = list(names)

    def forward(pixels: Sequence[Tensor]) -> Outputs:
        values = session.run(wanted, {INPUT_NAME: stack(pixels).numpy()})
        return {name: torch.from_numpy(value).float() for name, value in zip(wanted, values, strict=True)}

    return forward


@contextlib.contextmanager
def _quantizer_quiet(package: Path) -> Iterator[None]:
    """ONNX Runtime's quantizer logs through the root logger: a line per tensor and per skipped MatMul at info, and
    advice meant for a model's author ("consider pre-processing"), a few hundred lines per export. Its records
    below error are dropped for the duration of a quantization (a filter on the root logger sees only records logged
    to it directly, never the service's own named loggers')."""
    prefix = str(package) + os.sep

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(prefix)

    root = logging.getLogger()
    with _QUANTIZING:
        root.addFilter(keep)
        try:
            yield
        finally:
            root.removeFilter(keep)
