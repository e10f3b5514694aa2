"""TensorFlow ``tf_model.h5`` checkpoints (transformers 4.x ``TFDeiT*`` / ``TFViT*`` ``save_pretrained``).

The file is Keras 2's H5 weights format, read with h5py (an optional extra: ``pip install 'deit-serve[tf]'``);
TensorFlow itself is never needed. ``read_keras_h5`` returns the tensors under their TF variable names and
``tf_to_hf`` is the pure rename/transpose to the names ``save_pretrained`` writes for PyTorch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.errors import CheckpointError

TF_WEIGHTS_NAME = "tf_model.h5"
H5_SUFFIXES = (".h5", ".hdf5")


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as e:
        raise CheckpointError(
            "reading a TensorFlow .h5 checkpoint needs h5py, an optional extra: pip install 'deit-serve[tf]' "
            "(or convert the checkpoint to safetensors elsewhere)"
        ) from e
    return h5py


def read_keras_h5(path: Path) -> dict[str, Tensor]:
    """Every weight of a Keras 2 H5 weights file, by its variable name (``scope/…/kernel:0``), as float tensors."""
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            if "layer_names" not in f.attrs:
                raise CheckpointError(
                    f"{path}: not a Keras weights file as transformers' TF save_pretrained writes (Keras 2 H5, "
                    "with a 'layer_names' attribute)"
                )
            tensors: dict[str, Tensor] = {}
            for layer in _strings(f.attrs["layer_names"]):
                group = f[layer]
                for name in _strings(group.attrs.get("weight_names", [])):
                    array = np.asarray(group[name])
                    if not np.issubdtype(array.dtype, np.floating):
                        raise CheckpointError(f"{path}: weight {name!r} has non-float dtype {array.dtype}")
                    tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable HDF5 file ({e})") from e
    except KeyError as e:
        raise CheckpointError(f"{path}: weight listed but missing from the file ({e})") from e
    if not tensors:
        raise CheckpointError(f"{path}: holds no weights")
    return tensors


def _strings(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def is_tf_state_dict(state: Mapping[str, Tensor]) -> bool:
    return any(k.endswith(":0") for k in state)


_LEAF = {"kernel": "weight", "gamma": "weight", "beta": "bias"}


def tf_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """TF variable names → PyTorch ``save_pretrained`` names; Dense kernels ``[in, out]`` and conv kernels
    ``[kh, kw, in, out]`` are transposed to torch's ``[out, in]`` and ``[out, in, kh, kw]``."""
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        parts = name.removesuffix(":0").split("/")
        if len(parts) > 1:
            parts = parts[1:]  # the model's own scope, e.g. tf_dei_t_for_image_classification_with_teacher
        leaf = parts[-1]
        if leaf == "kernel":
            if value.ndim == 4:
                value = value.permute(3, 2, 0, 1)
            elif value.ndim == 2:
                value = value.t()
            else:
                raise CheckpointError(f"TF weight {name!r} is a kernel of unexpected rank {value.ndim}")
        parts[-1] = _LEAF.get(leaf, leaf)
        key = re.sub(r"_\._(\d+)", r".\1", ".".join(parts))  # layer_._3 → layer.3 (TF's list naming)
        if key in out:
            raise CheckpointError(f"TF weights {name!r} and another both map to {key!r}")
        out[key] = value.contiguous()
    return out
