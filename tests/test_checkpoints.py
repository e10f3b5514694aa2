"""Checkpoint loading: labels, config defaults, dtypes, and clear errors for every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from service.errors import CheckpointError
from service.model.architecture import Architecture
from service.model.checkpoints import load_checkpoint, resolve_device, resolve_dtype
from tests.factories import TINY, edit_config_json, hf_model, rewrite_safetensors, save_hf, save_timm

HEADS = TINY["num_attention_heads"]


def _outputs_match(model: PreTrainedModel, directory: Path, pixel_values: torch.Tensor) -> None:
    ours = load_checkpoint(directory).model
    with torch.inference_mode():
        torch.testing.assert_close(ours(pixel_values), model(pixel_values).logits, atol=1e-4, rtol=0)


# --- labels ---------------------------------------------------------------------------------------------------


def test_labels_come_from_id2label(distilled_model: PreTrainedModel, tmp_path: Path) -> None:
    directory = save_hf(distilled_model, tmp_path / "ckpt")
    names = ["cat", "dog", "fox", "owl", "eel"]
    edit_config_json(directory, id2label={str(i): n for i, n in enumerate(names)})
    checkpoint = load_checkpoint(directory)
    assert checkpoint.labels == names
    assert checkpoint.config.num_labels == 5


def test_imagenet_names_attached_to_1000_class_pth(tmp_path: Path) -> None:
    path = save_timm(hf_model("distilled", num_labels=1000), tmp_path / "deit" / "deit_tiny.pth")
    for source in (path, path.parent):
        checkpoint = load_checkpoint(source, num_heads=HEADS)
        assert len(checkpoint.labels) == 1000
        assert checkpoint.labels[281] == "tabby, tabby cat"
        assert checkpoint.labels[0] == "tench, Tinca tinca"


def test_pth_without_1000_classes_gets_generic_labels(tmp_path: Path) -> None:
    path = save_timm(hf_model("distilled", num_labels=5), tmp_path / "deit.pth")
    assert load_checkpoint(path, num_heads=HEADS).labels == [f"LABEL_{i}" for i in range(5)]


@pytest.mark.parametrize("num_labels", [5, 1000])
def test_labels_txt_beside_pth_overrides(num_labels: int, tmp_path: Path) -> None:
    path = save_timm(hf_model("distilled", num_labels=num_labels), tmp_path / "deit.pth")
    names = [f"species {i}" for i in range(num_labels)]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    assert load_checkpoint(path, num_heads=HEADS).labels == names


def test_labels_json_map_beside_pth(tmp_path: Path) -> None:
    path = save_timm(hf_model("vit", num_labels=3), tmp_path / "vit.pth")
    (tmp_path / "labels.json").write_text(json.dumps({"2": "c", "0": "a", "1": "b"}))
    assert load_checkpoint(path, num_heads=HEADS).labels == ["a", "b", "c"]


def test_labels_file_with_wrong_count_is_refused(tmp_path: Path) -> None:
    path = save_timm(hf_model("distilled", num_labels=5), tmp_path / "deit.pth")
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    with pytest.raises(CheckpointError, match=r"labels\.txt.*3 labels.*5 output classes"):
        load_checkpoint(path, num_heads=HEADS)


# --- config ---------------------------------------------------------------------------------------------------


def test_old_config_without_recent_fields_loads_with_defaults(
    distilled_model: PreTrainedModel, distilled_dir: Path, pixel_values: torch.Tensor
) -> None:
    raw = edit_config_json(distilled_dir, qkv_bias=None, encoder_stride=None, torch_dtype=None, dtype=None)
    assert not {"qkv_bias", "encoder_stride", "torch_dtype", "dtype"} & set(raw)
    config = load_checkpoint(distilled_dir).config
    assert config.qkv_bias is True
    assert config.encoder_stride == 16
    assert config.torch_dtype == "float32"
    _outputs_match(distilled_model, distilled_dir, pixel_values)


def test_qkv_without_bias(tmp_path: Path, pixel_values: torch.Tensor) -> None:
    model = hf_model("distilled", qkv_bias=False)
    directory = save_hf(model, tmp_path / "ckpt")
    assert load_checkpoint(directory).config.qkv_bias is False
    _outputs_match(model, directory, pixel_values)


def test_dtype_recorded_by_transformers_is_read(tmp_path: Path) -> None:
    directory = save_hf(hf_model("distilled").to(torch.bfloat16), tmp_path / "ckpt")
    raw = json.loads((directory / "config.json").read_text())
    assert (raw.get("torch_dtype") or raw.get("dtype")) == "bfloat16"
    checkpoint = load_checkpoint(directory, dtype="float32")
    assert checkpoint.config.torch_dtype == "bfloat16"
    assert {p.dtype for p in checkpoint.model.parameters()} == {torch.float32}


def test_timm_heads_default_to_head_dim_64(tmp_path: Path) -> None:
    path = save_timm(hf_model("distilled", hidden_size=128, num_attention_heads=2), tmp_path / "deit.pth")
    config = load_checkpoint(path).config
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (128, 2, 64)
    assert (config.num_hidden_layers, config.patch_size, config.image_size) == (2, 2, 30)
    assert config.intermediate_size == 37


# --- dtype and device -----------------------------------------------------------------------------------------


def _cpu_has_native_bf16() -> bool:
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def test_auto_dtype_follows_the_hardware() -> None:
    expected_cpu = torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected_cpu
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16


def test_auto_dtype_is_what_loading_uses(distilled_dir: Path) -> None:
    checkpoint = load_checkpoint(distilled_dir, dtype="auto")
    assert checkpoint.dtype == resolve_dtype("auto", torch.device("cpu"))
    assert {p.dtype for p in checkpoint.model.parameters()} == {checkpoint.dtype}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("half", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_explicit_dtype_overrides(spec: str | torch.dtype, expected: torch.dtype, distilled_dir: Path) -> None:
    checkpoint = load_checkpoint(distilled_dir, dtype=spec)
    assert checkpoint.dtype == expected
    assert {t.dtype for t in checkpoint.model.state_dict().values()} == {expected}


def test_unknown_dtype_is_refused(distilled_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="unknown dtype 'float8'"):
        load_checkpoint(distilled_dir, dtype="float8")


def test_cuda_device_needs_cuda() -> None:
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(CheckpointError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("source", ["hf", "timm"])
def test_model_built_on_meta_holds_real_tensors(source: str, tmp_path: Path) -> None:
    model = hf_model("distilled")
    path = save_hf(model, tmp_path / "hf") if source == "hf" else save_timm(model, tmp_path / "deit.pth")
    loaded = load_checkpoint(path, dtype="bfloat16", num_heads=HEADS).model
    tensors = [*loaded.parameters(), *loaded.buffers()]
    assert tensors
    assert not [t for t in tensors if t.is_meta]
    assert {t.device.type for t in tensors} == {"cpu"}
    assert not any(t.requires_grad for t in tensors)
    assert not loaded.training


# --- errors ---------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"absent: no such file"):
        load_checkpoint(tmp_path / "absent")


def test_directory_without_weights(distilled_dir: Path) -> None:
    (distilled_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_checkpoint(distilled_dir)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    directory = save_hf(hf_model("distilled"), tmp_path / "ckpt", "sharded")
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_checkpoint(directory)


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_safetensors(keep: float, distilled_dir: Path) -> None:
    weights = distilled_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a readable safetensors file"):
        load_checkpoint(distilled_dir)


def test_truncated_pth(tmp_path: Path) -> None:
    path = save_timm(hf_model("distilled"), tmp_path / "deit.pth")
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"deit\.pth.*not a readable PyTorch checkpoint"):
        load_checkpoint(path, num_heads=HEADS)


def test_wrong_shape_names_the_tensor(distilled_dir: Path) -> None:
    state = load_file(str(distilled_dir / "model.safetensors"))
    state["cls_classifier.weight"] = torch.zeros(6, TINY["hidden_size"])
    rewrite_safetensors(distilled_dir, state)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'cls_classifier\.weight' has shape \(6, 32\)"):
        load_checkpoint(distilled_dir)


def test_missing_tensor_is_named(distilled_dir: Path) -> None:
    state = load_file(str(distilled_dir / "model.safetensors"))
    del state["deit.encoder.layer.1.attention.attention.value.bias"]
    rewrite_safetensors(distilled_dir, state)
    with pytest.raises(CheckpointError, match=r"missing tensors \['deit\.encoder\.layer\.1\.attention\.attention"):
        load_checkpoint(distilled_dir)


def test_unexpected_tensor_is_named(distilled_dir: Path) -> None:
    state = load_file(str(distilled_dir / "model.safetensors"))
    state["deit.encoder.layer.0.attention.relative_position_bias"] = torch.zeros(4)
    rewrite_safetensors(distilled_dir, state)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['deit\.encoder\.layer\.0\.attention\.relative"):
        load_checkpoint(distilled_dir)


def test_integer_tensor_is_refused(distilled_dir: Path) -> None:
    state = load_file(str(distilled_dir / "model.safetensors"))
    state["deit.layernorm.bias"] = torch.zeros(TINY["hidden_size"], dtype=torch.int64)
    rewrite_safetensors(distilled_dir, state)
    with pytest.raises(CheckpointError, match=r"'deit\.layernorm\.bias' has non-float dtype torch\.int64"):
        load_checkpoint(distilled_dir)


def test_unknown_architecture_in_config(distilled_dir: Path) -> None:
    edit_config_json(distilled_dir, architectures=["DeiTForObjectDetection"])
    with pytest.raises(CheckpointError, match=r"config\.json: unknown architecture \['DeiTForObjectDetection'\]"):
        load_checkpoint(distilled_dir)


def test_config_json_that_is_not_json(distilled_dir: Path) -> None:
    (distilled_dir / "config.json").write_text("{'hidden_size': 32")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(distilled_dir)


def test_pth_that_is_not_a_deit(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(CheckpointError, match=r"resnet\.pth: not a timm/facebookresearch DeiT checkpoint"):
        load_checkpoint(path)


def test_directory_with_several_pth_is_ambiguous(tmp_path: Path) -> None:
    model = hf_model("distilled")
    save_timm(model, tmp_path / "a.pth")
    save_timm(model, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match=r"exactly one checkpoint file.*'a\.pth', 'b\.pth'"):
        load_checkpoint(tmp_path)


class _RunsCode:
    """Unpickling this runs arbitrary Python: here, it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('owned')",))


Layout = Literal["pth-zip", "pth-legacy", "raw-pickle", "hf-bin"]


def _write_malicious(layout: Layout, tmp_path: Path, marker: Path) -> Path:
    good = {"cls_token": torch.zeros(1, 1, 32), "pos_embed": torch.zeros(1, 227, 32)}
    payload = {"model": {**good, "extra": _RunsCode(marker)}}
    if layout == "hf-bin":
        directory = save_hf(hf_model("distilled"), tmp_path / "hf", "bin")
        torch.save({"deit.layernorm.weight": _RunsCode(marker)}, directory / "pytorch_model.bin")
        return directory
    path = tmp_path / "deit.pth"
    if layout == "pth-zip":
        torch.save(payload, path)
    elif layout == "pth-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return path


def _unsafe_load(path: Path) -> None:
    """What loading without ``weights_only`` would do: proves the payload is live."""
    if path.is_dir():
        path = path / "pytorch_model.bin"
    try:
        torch.load(path, weights_only=False)
    except RuntimeError:
        with path.open("rb") as f:
            pickle.load(f)


@pytest.mark.parametrize("layout", ["pth-zip", "pth-legacy", "raw-pickle", "hf-bin"])
def test_pickle_that_runs_code_is_refused(layout: Layout, tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = _write_malicious(layout, tmp_path, marker)
    with pytest.raises(CheckpointError, match=r"(deit\.pth|pytorch_model\.bin): refused to load"):
        load_checkpoint(path)
    assert not marker.exists(), "loading a checkpoint executed code from it"
    _unsafe_load(path)
    assert marker.read_text() == "owned"


def test_architecture_guessed_for_config_without_architectures(distilled_dir: Path) -> None:
    edit_config_json(distilled_dir, architectures=None)
    assert load_checkpoint(distilled_dir).config.architecture is Architecture.DISTILLED
