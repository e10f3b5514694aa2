"""Runtimes behind one contract: whatever executes the forward pass (eager torch, OpenVINO, ONNX Runtime) gives
the runner the same ``Forward`` (stacked images in, float32 outputs by name out), so batching, deadlines,
the non-finite guard and metrics never know which one runs. The model is always built by our own loader from any
checkpoint; the other runtimes are fed by exporting that module at load time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor, nn

from service.engine.runner import Forward
from service.engine.runtimes.cache import default_cache_dir
from service.model.deit import DeiT
from service.model.pooling import serving_outputs

TORCH, OPENVINO, ONNXRUNTIME, AUTO = "torch", "openvino", "onnxruntime", "auto"
RUNTIMES = (TORCH, OPENVINO, ONNXRUNTIME)
FLOAT32, BFLOAT16, FLOAT16, INT8 = "float32", "bfloat16", "float16", "int8"
INPUT_NAME = "pixel_values"
# Bumped whenever the exported graph changes for the same weights, so that cached artefacts are not reused.
# 2: traced through forward_features/forward_head and pooling.serving_outputs (was DeiT.outputs).
EXPORT_VERSION = "2"


class RuntimeUnavailable(Exception):
    """A runtime that is not installed, cannot serve the precision asked for, or failed to export or load."""


def installed_version(distribution: str) -> str:
    """The installed version of a runtime's package; RuntimeUnavailable naming the extra that brings it."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        raise RuntimeUnavailable(
            f"{distribution} is not installed (pip install 'deit-serve[{distribution}]')"
        ) from None


@dataclass(frozen=True)
class RuntimeInfo:
    """Which runtime serves a model, at which precision, and why it was chosen (for the log, metadata, metrics)."""

    name: str = TORCH
    precision: str = FLOAT32
    reason: str = "--runtime torch"


@dataclass
class Runtime:
    info: RuntimeInfo
    forward: Forward
    owns_weights: bool  # it holds its own copy of the weights: the torch module's can be freed


@dataclass(frozen=True)
class RuntimeOptions:
    """What the service asks of the runtime: which one, the precision spec, its thread policy and its cache."""

    runtime: str = TORCH
    dtype: str = "auto"
    quantize: str = "none"
    threads: int = 1  # intra-op threads of a pass that runs alone
    streams: int = 1  # batches that may run at once (the runner's forward slots)
    cache_dir: Path = field(default_factory=default_cache_dir)
    measure_s: float = 0.5  # per candidate, when choosing by measurement
    max_batch_size: int = 32


class OutputsModule(nn.Module):
    """``serving_outputs`` of the model (logits and token features) as a module returning a tuple in a fixed order:
    what exporters trace."""

    def __init__(self, model: DeiT, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        out = serving_outputs(self.model, pixel_values)
        return tuple(out[name] for name in self.names)


def output_names(model: DeiT, image_shape: tuple[int, int, int]) -> list[str]:
    """The names of the outputs the engine uses, in the order an exported graph returns them."""
    with torch.inference_mode():
        example = torch.zeros((1, *image_shape), dtype=next(model.parameters()).dtype)
        return [str(name) for name in serving_outputs(model, example)]


def shape_key(image_shape: tuple[int, int, int]) -> str:
    """An export's fixed input shape as a cache-key part: the preprocessor's crop, which the weights' digest does
    not cover (the same weights served at another size need their own artefact)."""
    return "x".join(str(n) for n in image_shape)


def stack(pixels: Sequence[Tensor]) -> Tensor:
    """One contiguous float32 batch on the CPU, as the exported runtimes take it."""
    return torch.stack(list(pixels)).float().contiguous()
