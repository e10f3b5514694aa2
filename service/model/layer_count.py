"""The encoder depth a config asks for, checked against the checkpoint's tensors before any layer is built: a
config that asks for a million layers is refused in microseconds, not after gigabytes of layer objects."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from service.errors import CheckpointError
from service.model.architecture import DeiTConfig

# Several times deeper than any DeiT or ViT released; a config asking for more is not a real model.
MAX_HIDDEN_LAYERS = 256


def check_layer_count(config: DeiTConfig, state: Mapping[str, Tensor], source: Path) -> None:
    """``num_hidden_layers`` within ``MAX_HIDDEN_LAYERS`` and, when the weights hold encoder layers under the config's
    names, equal to them (0..n-1)."""
    asked = config.num_hidden_layers
    if asked > MAX_HIDDEN_LAYERS:
        raise CheckpointError(f"{source}: num_hidden_layers {asked} is above the limit of {MAX_HIDDEN_LAYERS}")
    layer = re.compile(rf"{re.escape(config.prefix)}encoder\.layer\.(\d+)\.")
    held = {int(m.group(1)) for key in state if (m := layer.match(key))}
    if not held:
        return  # no encoder under the config's names at all: the tensor comparison after building names what differs
    if held != set(range(asked)):
        raise CheckpointError(
            f"{source}: the config asks for {asked} encoder layers, the weights hold {len(held)} "
            f"(layer indices {_ranges(held)})"
        )


def _ranges(indices: set[int]) -> str:
    """``0..11`` for a contiguous run from 0, else the first few indices (``indices`` is never empty)."""
    ordered = sorted(indices)
    if ordered == list(range(len(ordered))):
        return f"0..{len(ordered) - 1}"
    shown = ", ".join(map(str, ordered[:6]))
    return shown + (", …" if len(ordered) > 6 else "")
