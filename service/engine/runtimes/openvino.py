"""OpenVINO: the module converted with ``openvino.convert_model`` (dynamic batch), saved as IR in the artefact
cache, compiled for the CPU at the precision asked for (bf16 only where the CPU has it natively) on the service's
threads; int8 is that IR with its weights compressed to int8 by NNCF (``nncf.compress_weights``). Each forward
thread keeps its own infer request."""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
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
    INT8,
    OPENVINO,
    OutputsModule,
    RuntimeUnavailable,
    installed_version,
    shape_key,
    stack,
)
from service.engine.runtimes.cache import ArtefactCache, entry_key
from service.model.deit import DeiT

# int8: the compressed weights are int8; activations and every other op stay float32.
_PRECISIONS = {FLOAT32: "f32", BFLOAT16: "bf16", INT8: "f32"}
# Bumped whenever the quantization below changes (algorithm or its options), so that cached artefacts are not reused.
QUANTIZATION_VERSION = "1"
log = logging.getLogger("deit_serve.runtimes")
_QUANTIZING = threading.Lock()  # one at a time: silencing NNCF's output is process-wide
_NEEDS_NNCF = "openvino int8 needs nncf, and {}: pip install 'deit-serve[openvino-int8]'"


def version() -> str:
    return installed_version("openvino")


def nncf_version() -> str:
    """The installed version of NNCF, which quantizes for OpenVINO (read from its metadata: importing NNCF takes
    seconds, and a start that finds its int8 IR in the cache never needs it); RuntimeUnavailable naming the extra."""
    try:
        return installed_version("nncf")
    except RuntimeUnavailable:
        raise RuntimeUnavailable(_NEEDS_NNCF.format("it is not installed")) from None


def _import_nncf() -> Any:
    """NNCF itself, for a compression; RuntimeUnavailable naming the extra when it does not import."""
    try:
        import nncf
    except ImportError as e:
        raise RuntimeUnavailable(_NEEDS_NNCF.format(f"it does not import ({e})")) from None
    return nncf


def decline_usage_reports() -> None:
    """OpenVINO's converter and NNCF send usage reports (to Google Analytics, each event from a forked copy of the
    calling process) and write a client id and counters under ``~/intel``, unless a consent file there says no;
    they ask for that consent only in an interactive terminal. A server is not one, and a fork of a process with
    many threads and a model in memory is not free: the consent check their telemetry makes answers "declined" in
    this process, so nothing is sent, forked or written. Called before ``openvino`` is first imported (importing it
    makes the first check); the service imports it nowhere else."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:  # not installed (OpenVINO's tools fall back to their own silent stand-in), or moved
        log.debug("openvino_telemetry's consent check not found: usage reports left as OpenVINO decides")
        return

    def declined(*_args: object, **_kwargs: object) -> object:
        return ConsentCheckResult.DECLINED

    OptInChecker.check = declined


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
        raise RuntimeUnavailable(f"OpenVINO serves float32, bfloat16 or int8 on the CPU, not {precision}")
    decline_usage_reports()  # before OpenVINO's first import, which already asks for that consent
    try:
        import openvino as ov
    except ImportError as e:
        raise RuntimeUnavailable(f"openvino does not import: {e}") from e
    # The IR is traced by torch (its version is in the key) and fixed to the model's input shape.
    parts = [digest, OPENVINO, ov_version, torch.__version__, EXPORT_VERSION, ",".join(names), shape_key(image_shape)]
    files = ["model.xml", "model.bin"]
    if precision == INT8:  # its own entry: float32 and bf16 share the unquantized IR's
        parts += [INT8, "nncf", nncf_version(), QUANTIZATION_VERSION]
        files = ["model.int8.xml", "model.int8.bin"]

    def export(directory: Path) -> list[str]:
        if precision == INT8:
            _import_nncf()  # before the conversion: a broken NNCF fails at once, by name
        wrapper = OutputsModule(model, names).eval()
        # Tracing warns of shape-dependent Python values; the batch dimension is made dynamic below.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = ov.convert_model(wrapper, example_input=torch.zeros((2, *image_shape)))
        converted.reshape({converted.inputs[0]: ov.PartialShape([-1, *image_shape])})
        for port, name in zip(converted.outputs, names, strict=True):
            port.get_tensor().set_names({name})
        if precision == INT8:
            converted = compress_weights(converted)
        ov.save_model(converted, directory / files[0], compress_to_fp16=False)
        return files

    key = entry_key(*parts)
    try:
        entry = cache.get_or_build(key, export, f"openvino {ov_version} {precision}")
    except RuntimeUnavailable:
        raise
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
        compiled = core.compile_model(core.read_model(entry / files[0]), "CPU", config)
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


def compress_weights(converted: Any) -> Any:
    """``converted`` with the weights of its matmuls (the encoder's Linears, the patch embedding and the heads)
    stored as int8, asymmetric, per output channel, and activations left float32 (NNCF's data-free int8 weight
    compression): a quarter of the weights' memory, read as int8 by the CPU plugin's matmul kernels.

    Why not NNCF's post-training quantization (``nncf.quantize``, int8 activations with static ranges): it needs
    calibration data, and no data set comes with a checkpoint; the loader has only the warm-up probes (one
    synthetic photo and seeded noise). Calibrated on those, it kept the embedded digits model's held-out accuracy
    (97.8 % against float32's 97.5 %), but on the 64 photos and random inputs of benchmarks/runtimes.py's DeiT-tiny
    its top-1 agreed with float32 torch's on only 29 (37–40 with 16 probes or without SmoothQuant), where weight
    compression agrees on 63 and torch's and ONNX Runtime's int8 on 54 and 58; and it was slower than float32 on a
    CPU without int8 dot products. Weight compression needs no data (the artefact depends on the weights alone) and
    takes seconds."""
    nncf = _import_nncf()
    with _QUANTIZING, _nncf_quiet():
        return nncf.compress_weights(converted, mode=nncf.CompressWeightsMode.INT8_ASYM)


@contextlib.contextmanager
def _nncf_quiet() -> Iterator[None]:
    """NNCF's progress bars (rich, on the process's console) silenced and its log records (its own stdout
    handler: the bit-width table) sent through the service's logging at WARNING and above, for the duration of a
    compression."""
    import rich
    from nncf.common.logging.logger import nncf_logger

    console = rich.get_console()
    saved = console.quiet, nncf_logger.handlers[:], nncf_logger.propagate, nncf_logger.level
    console.quiet = True
    nncf_logger.handlers.clear()
    nncf_logger.propagate = True
    nncf_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        console.quiet = saved[0]
        nncf_logger.handlers[:] = saved[1]
        nncf_logger.propagate = saved[2]
        nncf_logger.setLevel(saved[3])
