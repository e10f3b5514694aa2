"""Load DeiT checkpoints (HF directories, timm/facebookresearch ``.pth``) into ``service.model.DeiT``.

HF directories may hold ``save_pretrained``'s weights, a state dict saved by hand from transformers ≥ 5 (its
in-memory names), or a TensorFlow ``tf_model.h5``; the writer-specific renames live beside the model
(``hf_names``, ``tf``, ``timm``) and this module only reads files and loads strictly.

Loading never executes code from a checkpoint (safetensors, or ``torch.load(weights_only=True)``), is strict
(every missing, unexpected or mis-shaped tensor is an error naming key and file), and builds the model on the
``meta`` device so that the weights are held once, already in the target dtype.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.errors import CheckpointError
from service.model.architecture import Architecture, DeiTConfig
from service.model.deit import DeiT, build_deit
from service.model.hf_names import from_transformers5_names, has_transformers5_names
from service.model.json_files import read_json_object
from service.model.preprocessing import PreprocessConfig
from service.model.tf import H5_SUFFIXES, TF_WEIGHTS_NAME, is_tf_state_dict, read_keras_h5, tf_to_hf
from service.model.timm import is_timm_state_dict, timm_to_hf

PTH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
WEIGHT_SUFFIXES = (*PTH_SUFFIXES, *H5_SUFFIXES)
LABEL_FILES = ("labels.txt", "labels.json")


@dataclass
class LoadedCheckpoint:
    model: DeiT
    config: DeiTConfig
    preprocess: PreprocessConfig
    source: Path
    dtype: torch.dtype
    device: torch.device

    @property
    def labels(self) -> list[str]:
        return [self.config.id2label[i] for i in range(self.config.num_labels)]

    @functools.cached_property
    def num_parameters(self) -> int:
        """Weights of the model, dynamic int8 Linears' packed ones included (they are not ``parameters()``)."""
        packed = 0
        for m in self.model.modules():
            if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
                packed += m.in_features * m.out_features + (m.out_features if m.bias() is not None else 0)  # type: ignore[no-untyped-call]
        return sum(p.numel() for p in self.model.parameters()) + packed


# --- dtype / device -------------------------------------------------------------------------------------------


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise CheckpointError(f"invalid device {spec!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {spec!r} requested but CUDA is not available")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto``: float16 on CUDA, bfloat16 on CPUs with native bf16, else float32."""
    if spec == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    try:
        return _DTYPES[spec.lower()]
    except KeyError:
        raise CheckpointError(f"unknown dtype {spec!r}; expected auto, {', '.join(sorted(_DTYPES))}") from None


# --- reading tensors ------------------------------------------------------------------------------------------


def _read_tensor_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix in H5_SUFFIXES:
        return read_keras_h5(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds more than tensors ({e}). Convert it to safetensors."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    return _unwrap_state_dict(obj, path)


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """Tensors may sit at the top level or under ``model`` / ``state_dict`` (training checkpoints)."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def _read_hf_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    """An HF directory's weights: single or sharded, safetensors preferred over ``.bin``, then TF's ``.h5``; else
    the directory's one weights file of any name (a state dict saved by hand beside its ``config.json``)."""
    for name in ("model.safetensors", "pytorch_model.bin", TF_WEIGHTS_NAME):
        if (directory / name).is_file():
            return _read_tensor_file(directory / name), directory / name
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
            tensors: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(_read_tensor_file(directory / shard))
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise CheckpointError(f"{index}: tensors listed but not in any shard: {missing[:5]}")
            return tensors, index
    files = [p for p in sorted(directory.iterdir()) if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    if len(files) == 1:
        return _read_tensor_file(files[0]), files[0]
    raise CheckpointError(
        f"{directory}: no weights found (expected model.safetensors, pytorch_model.bin, {TF_WEIGHTS_NAME}, a sharded "
        f"index, or exactly one {'/'.join(WEIGHT_SUFFIXES)} file; found {[f.name for f in files]})"
    )


def to_saved_layout(state: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    """Any HF writer's tensor names (PyTorch on disk, transformers ≥ 5 in memory, TensorFlow) → the on-disk ones."""
    try:
        if is_tf_state_dict(state):
            state = tf_to_hf(state)
        if has_transformers5_names(state):
            state = from_transformers5_names(state)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from e
    return state


# --- labels ---------------------------------------------------------------------------------------------------


def imagenet_labels() -> list[str]:
    text = resources.files("service").joinpath("data/imagenet1k_labels.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line]


def read_labels_file(path: Path) -> list[str]:
    """``labels.txt`` (one per line) or ``labels.json`` (a list, or an ``{"index": label}`` map)."""
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(raw, dict):
                return [str(raw[k]) for k in sorted(raw, key=int)]
            return [str(x) for x in raw]
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable labels file ({e})") from e


def _attach_labels(config: DeiTConfig, directory: Path, source: Path, keep_existing: bool) -> DeiTConfig:
    for name in LABEL_FILES:
        path = directory / name
        if path.is_file():
            labels = read_labels_file(path)
            if len(labels) != config.num_labels:
                raise CheckpointError(
                    f"{path}: has {len(labels)} labels but {source} has {config.num_labels} output classes"
                )
            return config.with_labels(labels)
    if not keep_existing and config.num_labels == 1000:
        return config.with_labels(imagenet_labels())
    return config


# --- building and strict loading ------------------------------------------------------------------------------


def _add_missing_prefix(state: dict[str, Tensor], config: DeiTConfig) -> dict[str, Tensor]:
    """Bare HF models are saved without the ``deit.``/``vit.`` prefix; heads never are."""
    prefix = config.prefix
    if any(k.startswith(prefix) for k in state):
        return state
    body = ("embeddings.", "encoder.", "layernorm.", "pooler.")
    return {prefix + k if k.startswith(body) else k: v for k, v in state.items()}


def build_model(
    config: DeiTConfig, state: Mapping[str, Tensor], source: Path, dtype: torch.dtype, device: torch.device
) -> DeiT:
    """Create the model on ``meta`` and assign the checkpoint's tensors, converted once to ``dtype`` on ``device``."""
    with torch.device("meta"):
        model = build_deit(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_few(unexpected)}")
    for key in sorted(set(expected) & set(state)):
        if tuple(expected[key].shape) != tuple(state[key].shape):
            problems.append(
                f"tensor {key!r} has shape {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}"
            )
    if problems:
        raise CheckpointError(f"{source}: does not match a {config.architecture.value}: " + "; ".join(problems))
    converted = {}
    for key, value in state.items():
        if not value.is_floating_point():
            raise CheckpointError(f"{source}: tensor {key!r} has non-float dtype {value.dtype}")
        converted[key] = value.to(device=device, dtype=dtype)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _few(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:6])
    return f"[{shown}{', …' if len(keys) > 6 else ''}] ({len(keys)} in all)"


def _iter_candidates(path: Path) -> Iterator[Path]:
    yield from sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def load_checkpoint(path: Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                    num_heads: int | None = None) -> LoadedCheckpoint:  # fmt: skip
    """Load an HF directory, a directory holding one ``.pth`` (plus optional labels file), or a ``.pth`` file."""
    path = Path(path)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf_directory(path, dev, dt)
    if path.is_dir():
        files = list(_iter_candidates(path))
        if len(files) != 1:
            raise CheckpointError(
                f"{path}: expected config.json (HF format) or exactly one checkpoint file "
                f"({', '.join(PTH_SUFFIXES)}), found {[f.name for f in files]}"
            )
        return _load_single_file(files[0], dev, dt, num_heads)
    return _load_single_file(path, dev, dt, num_heads)


def _load_hf_directory(directory: Path, device: torch.device, dtype: torch.dtype) -> LoadedCheckpoint:
    config_path = directory / "config.json"
    config = DeiTConfig.from_hf_dict(read_json_object(config_path), source=str(config_path))
    state, weights_path = _read_hf_weights(directory)
    state = _add_missing_prefix(to_saved_layout(state, weights_path), config)
    if config.architecture is Architecture.BARE and f"{config.prefix}pooler.dense.weight" in state:
        config = replace(config, add_pooling_layer=True)
    config = _attach_labels(config, directory, weights_path, keep_existing=True)
    model = build_model(config, state, weights_path, dtype, device)
    preprocess = PreprocessConfig.from_directory(directory, default_size=config.image_size)
    return LoadedCheckpoint(model, config, preprocess, directory, dtype, device)


def _load_single_file(path: Path, device: torch.device, dtype: torch.dtype, num_heads: int | None) -> LoadedCheckpoint:
    state = _read_tensor_file(path)
    if not is_timm_state_dict(state):
        raise CheckpointError(
            f"{path}: not a timm/facebookresearch DeiT checkpoint (no 'pos_embed'/'patch_embed.proj.weight'); "
            "HF and TensorFlow checkpoints need their config.json beside them"
        )
    try:
        hf_state, config = timm_to_hf(state, num_heads=num_heads)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    config = _attach_labels(config, path.parent, path, keep_existing=False)
    model = build_model(config, hf_state, path, dtype, device)
    preprocess = PreprocessConfig.from_directory(path.parent, default_size=config.image_size)
    return LoadedCheckpoint(model, config, preprocess, path, dtype, device)
