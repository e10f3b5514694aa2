"""A broken model store never starts into limbo and a broken preprocessing config never reaches requests: any
failure while loading or warming up a model ends start-up with one JSON error line naming the model and the file,
and a non-zero exit; a non-finite score is answered as a JSON 500, never as ``"score": null``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from service.engine.batching import Batcher
from service.engine.decode_pool import DecodePool
from service.engine.repository import Repository
from service.engine.runner import ModelRunner, Outputs
from service.errors import CheckpointError, InferenceFailed, ModelLoadFailed
from service.metrics import Metrics
from service.model.architecture import DeiTConfig
from service.model.preprocessing import MAX_CONFIG_SIDE, PreprocessConfig
from service.settings import Settings
from tests.serving import (
    ServerProcess,
    failed_start,
    image_bytes,
    multipart,
    overflowing_head,
    run_server,
    scrape,
    write_tiny_model,
)

GOOD, BROKEN = "a-good", "b-broken"  # loaded in name order: the good model is loaded first
EXIT_BOUND_S = 90.0  # a tiny store loads (or fails) in seconds; 90 s leaves room for a loaded machine
SERVER_ENV = {"DEIT_DEVICE": "cpu", "DEIT_DTYPE": "float32", "DEIT_TORCH_THREADS": "1", "DEIT_MAX_BATCH_SIZE": "4"}


def _edit_json(path: Path, **changes: Any) -> None:
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def _config(**changes: Any) -> Callable[[Path], None]:
    return lambda model: _edit_json(model / "config.json", **changes)


def _preprocess(**changes: Any) -> Callable[[Path], None]:
    return lambda model: _edit_json(model / "preprocessor_config.json", **changes)


def _nan_weights(model: Path) -> None:
    path = model / "model.safetensors"
    state = load_file(str(path))
    state["deit.layernorm.weight"] = torch.full_like(state["deit.layernorm.weight"], math.nan)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")


def _store(tiny: Path, root: Path, corrupt: Callable[[Path], None]) -> Path:
    store = root / "store"
    shutil.copytree(tiny, store / GOOD)
    shutil.copytree(tiny, store / BROKEN)
    corrupt(store / BROKEN)
    return store


# --- real processes: a broken store exits non-zero, promptly, with one JSON error line -------------------------

# case → (corruption, file the error names, what else it says)
BROKEN_STORES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "zero attention heads": (_config(num_attention_heads=0), "config.json", "num_attention_heads"),
    "zero patch size": (_config(patch_size=0), "config.json", "patch_size"),
    "id2label a list": (_config(id2label=[f"class_{i}" for i in range(10)]), "config.json", "id2label"),
    "unknown resample filter": (_preprocess(resample=99), "preprocessor_config.json", "resample"),
    "zero image_std": (_preprocess(image_std=[0, 0, 0]), "preprocessor_config.json", "image_std"),
    # Passes every field check, fails inside the forward pass (an unexpected RuntimeError): warm-up catches it.
    "crop smaller than a patch": (_preprocess(crop_size=2), "preprocessor_config.json", "Kernel size"),
    "logits overflow to NaN": (overflowing_head, "preprocessor_config.json", "non-finite scores"),
}


def _wait_for_exit(server: ServerProcess, bound_s: float) -> tuple[int | None, float, set[int]]:
    """Poll /readyz until the process exits or ``bound_s`` passes: (exit code or None, seconds, statuses seen)."""
    started = time.monotonic()
    statuses: set[int] = set()
    while time.monotonic() - started < bound_s:
        if server.process.poll() is not None:
            return server.process.returncode, time.monotonic() - started, statuses
        with contextlib.suppress(httpx.HTTPError):
            statuses.add(httpx.get(f"{server.url}/readyz", timeout=2).status_code)
        time.sleep(0.1)
    return None, time.monotonic() - started, statuses


# The process's whole exit path is run for the case that passes every check and fails inside warm-up with an
# unexpected error (whose traceback goes inside the one JSON line, never raw beside it). Every case, the field checks
# of the checkpoint files included, is checked below through the same start-up in this process (``failed_start``).
IN_A_PROCESS = "crop smaller than a patch"


def test_a_model_failing_its_warm_up_exits_the_process_non_zero_with_one_json_error_line(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    corrupt, file_name, detail = BROKEN_STORES[IN_A_PROCESS]
    store = _store(tiny_model_dir, tmp_path, corrupt)
    with run_server(store, tmp_path, env=SERVER_ENV, wait=False) as server:
        code, seconds, statuses = _wait_for_exit(server, EXIT_BOUND_S)
        print(f"{IN_A_PROCESS}: exit code {code} after {seconds:.1f} s; /readyz statuses seen {sorted(statuses)}")
        assert code is not None, f"still running after {EXIT_BOUND_S} s (statuses {statuses}):\n{server.log()}"
        assert code != 0
        assert 200 not in statuses
        lines = [line for line in server.log().splitlines() if line.strip()]
        assert all(line.startswith("{") for line in lines), server.log()  # JSON only, no bare traceback
        errors = [r for r in map(json.loads, lines) if r["level"] in ("error", "critical")]
        assert len(errors) == 1, errors
        (error,) = errors
        assert error["model"] == BROKEN
        assert error["source"] == str(store / BROKEN)
        assert f"{BROKEN}/{file_name}" in error["message"]
        assert detail in error["message"]
        assert "Traceback" in error["exception"]  # the unexpected error's traceback, inside the one line


@pytest.mark.parametrize("case", list(BROKEN_STORES))
def test_every_broken_model_fails_start_up_with_one_error_line_naming_model_file_and_detail(
    case: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The start-up ``deit-serve`` runs, in this process, with the settings of ``SERVER_ENV`` (warm-up on): its one
    error line names the model, its source and the file at fault; the good model, first in name order, had loaded."""
    corrupt, file_name, detail = BROKEN_STORES[case]
    store = _store(tiny_model_dir, tmp_path, corrupt)
    values: dict[str, Any] = {"model_store": store, "device": "cpu", "dtype": "float32", "torch_threads": 1,
                              "max_batch_size": 4}  # fmt: skip
    settings = Settings(**values)  # SERVER_ENV's settings
    assert settings.warmup
    failed = failed_start(settings)
    print(f"{case}: {failed.line}")
    assert failed.record["code"] == "model_load_failed"
    assert failed.record["model"] == BROKEN
    assert failed.record["source"] == str(store / BROKEN)
    assert f"{BROKEN}/{file_name}" in failed.record["message"]
    assert detail in failed.record["message"]
    assert failed.loaded == [GOOD]  # loaded first, in name order: the broken one alone fails
    if case == IN_A_PROCESS:  # an unexpected error: its traceback goes inside the line
        assert "Traceback" in failed.record["exception"]
    else:  # a file at fault: its message says all, no traceback
        assert "exception" not in failed.record


def test_non_finite_scores_are_a_json_500_never_a_null_score(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Without warm-up nothing runs the model before requests: the batcher's check is the one that answers."""
    store = tmp_path / "store"
    overflowing_head(shutil.copytree(tiny_model_dir, store / BROKEN))
    with run_server(store, tmp_path, env={**SERVER_ENV, "DEIT_WARMUP": "false"}) as server:
        response = httpx.post(f"{server.url}/classify", files=multipart([image_bytes()]), timeout=60)
        assert response.status_code == 500, response.text
        assert "null" not in response.text
        error = response.json()["error"]
        assert error["code"] == "inference_failed"
        assert "non-finite" in error["message"]
        page = scrape(server)
        assert page.value("deit_nonfinite_outputs_total", model=BROKEN) == 1
        assert page.value("deit_requests_total", status="500") == 1
        records = server.log_records()
        assert any(r["message"] == "non-finite model outputs" and r["model"] == BROKEN for r in records)


# --- the store in process: NaN weights are refused at load, naming tensor and file ------------------------------


def test_nan_weights_are_refused_at_load_naming_the_tensor_and_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    store = _store(tiny_model_dir, tmp_path, _nan_weights)
    values: dict[str, Any] = {"model_store": store, "device": "cpu", "dtype": "float32", "warmup": False}
    settings = Settings(**values)
    with pytest.raises(ModelLoadFailed, match=r"'deit\.layernorm\.weight' holds NaN") as caught:
        Repository.open(settings, Metrics(settings.max_batch_size), DecodePool(1)).load_all()
    assert caught.value.model == BROKEN
    assert f"{BROKEN}/model.safetensors" in caught.value.message


# --- the batcher: only the image with non-finite scores fails, its batch-mates are answered ------------------------


def _nan_for_negative(pixels: Sequence[Tensor]) -> Outputs:
    rows = [torch.full((3,), math.nan) if p.sum() < 0 else torch.softmax(p, dim=0) for p in pixels]
    return {"logits": torch.stack(rows), "cls": torch.stack([p.abs() for p in pixels])}


@pytest.mark.asyncio
async def test_a_non_finite_row_fails_only_its_own_image() -> None:
    metrics = Metrics(8)
    runner = ModelRunner("m", _nan_for_negative)
    batcher = Batcher("m", runner, max_batch_size=8, max_batch_delay_s=0.0, max_queue_size=8, metrics=metrics)
    batcher.start()
    try:
        with batcher.admit(2) as admission:
            pixels = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, -2.0, -3.0])]
            good, bad = batcher.enqueue(admission, pixels, time.monotonic() + 30)
        results = await asyncio.gather(good.future, bad.future, return_exceptions=True)
    finally:
        await batcher.stop()
    assert isinstance(results[0], dict)
    assert bool(torch.isfinite(results[0]["logits"]).all())
    torch.testing.assert_close(results[0]["cls"], pixels[0])  # its row of every output
    assert isinstance(results[1], InferenceFailed)
    assert "non-finite" in results[1].message
    assert metrics.registry.get_sample_value("deit_nonfinite_outputs_total", {"model": "m", "version": "1"}) == 1


# --- config.json validators --------------------------------------------------------------------------------------

VALID_CONFIG: dict[str, Any] = {
    "architectures": ["DeiTForImageClassificationWithTeacher"],
    "model_type": "deit",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 4,
    "num_channels": 3,
    "layer_norm_eps": 1e-12,
    "qkv_bias": True,
    "hidden_act": "gelu",
    "id2label": {"0": "cat", "1": "dog"},
}

BAD_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "zero heads": ({"num_attention_heads": 0}, r"num_attention_heads must be a positive integer, got 0"),
    "negative heads": ({"num_attention_heads": -4}, r"num_attention_heads must be a positive integer"),
    "heads as a string": ({"num_attention_heads": "4"}, r"num_attention_heads must be an integer, got '4'"),
    "heads as a boolean": ({"num_attention_heads": True}, r"num_attention_heads must be an integer, got True"),
    "fractional heads": ({"num_attention_heads": 4.5}, r"num_attention_heads must be an integer, got 4\.5"),
    "heads not dividing hidden": ({"num_attention_heads": 3}, r"hidden_size 32 is not divisible by .* 3"),
    "zero patch": ({"patch_size": 0}, r"patch_size must be a positive integer, got 0"),
    "patch larger than image": ({"patch_size": 64}, r"patch_size 64 is larger than image_size 32"),
    "image size as a pair": ({"image_size": [32, 32]}, r"image_size must be an integer, got \[32, 32\]"),
    "null hidden size": ({"hidden_size": None}, r"hidden_size must be an integer, got None"),
    "zero layers": ({"num_hidden_layers": 0}, r"num_hidden_layers must be a positive integer"),
    "zero intermediate": ({"intermediate_size": 0}, r"intermediate_size must be a positive integer"),
    "zero channels": ({"num_channels": 0}, r"num_channels must be a positive integer"),
    "zero eps": ({"layer_norm_eps": 0}, r"layer_norm_eps must be a finite number above 0, got 0"),
    "negative eps": ({"layer_norm_eps": -1e-6}, r"layer_norm_eps must be a finite number above 0"),
    "infinite eps": ({"layer_norm_eps": math.inf}, r"layer_norm_eps must be a finite number above 0, got inf"),
    "eps as a string": ({"layer_norm_eps": "1e-12"}, r"layer_norm_eps must be a number"),
    "qkv_bias as a string": ({"qkv_bias": "false"}, r"qkv_bias must be true or false, got 'false'"),
    "id2label a list": ({"id2label": ["cat", "dog"]}, r"id2label must be a mapping .* got a list"),
    "id2label a string": ({"id2label": "cat,dog"}, r"id2label must be a mapping .* got a str"),
    "id2label word keys": ({"id2label": {"cat": "cat", "dog": "dog"}}, r"id2label keys must be integer .* 'cat'"),
    "id2label fractional keys": ({"id2label": {"0.5": "cat"}}, r"id2label keys must be integer .* '0\.5'"),
    "id2label number values": ({"id2label": {"0": 1, "1": 2}}, r"id2label\['0'\] must be a label string, got 1"),
    "id2label null values": ({"id2label": {"0": None}}, r"id2label\['0'\] must be a label string, got None"),
    "id2label with a gap": ({"id2label": {"0": "cat", "2": "dog"}}, r"id2label must number its labels 0\.\.1"),
    "id2label from 1": ({"id2label": {"1": "cat", "2": "dog"}}, r"id2label must number its labels 0\.\.1"),
    "id2label index twice": ({"id2label": {"0": "cat", "00": "dog"}}, r"id2label names one class index twice"),
    "num_labels disagrees": ({"num_labels": 5}, r"num_labels is 5 but id2label holds 2 labels"),
    "num_labels negative": ({"num_labels": -1}, r"num_labels must be a non-negative integer, got -1"),
    "no classes": ({"num_labels": 0, "id2label": {}}, r"num_labels is 0: a classifier .* needs at least one class"),
    "architectures a string": ({"architectures": "DeiTModel"}, r"architectures must be a list of class names"),
    "unknown architecture": ({"architectures": ["BertModel"]}, r"unknown architecture \['BertModel'\]"),
    "unknown activation": ({"hidden_act": "relu"}, r"unsupported hidden_act 'relu'"),
    "unknown model type": ({"model_type": "bert"}, r"unsupported model_type 'bert'"),
    "model type a number": ({"model_type": 3}, r"model_type must be a string, got 3"),
    "dtype a number": ({"torch_dtype": 16}, r"torch_dtype must be a dtype name, got 16"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_json_validation_names_file_and_field(case: str) -> None:
    changes, message = BAD_CONFIGS[case]
    with pytest.raises(CheckpointError, match=rf"^/m/config\.json: ({message})") as caught:
        DeiTConfig.from_hf_dict({**VALID_CONFIG, **changes}, source="/m/config.json")
    print(f"{case}: {caught.value.message}")


def test_config_json_accepts_what_writers_really_emit() -> None:
    config = DeiTConfig.from_hf_dict(
        {**VALID_CONFIG, "image_size": 32.0, "num_labels": 2, "id2label": {" 1": "dog", "0": "cat"}, "dtype": None}
    )
    assert (config.image_size, config.num_labels, config.id2label) == (32, 2, {0: "cat", 1: "dog"})
    bare = DeiTConfig.from_hf_dict({"architectures": ["DeiTModel"], "model_type": "deit", "num_labels": 0})
    assert bare.num_labels == 0
    assert DeiTConfig().num_labels == 0  # the dataclass defaults stay constructible


# --- preprocessor_config.json validators ---------------------------------------------------------------------------

BAD_PREPROCESS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown resample": ({"resample": 99}, r"resample must be a PIL filter number \(0 nearest.*\), got 99"),
    "negative resample": ({"resample": -1}, r"resample must be a PIL filter number .* got -1"),
    "resample by name": ({"resample": "bicubic"}, r"resample must be a PIL filter number .* got 'bicubic'"),
    "resample a boolean": ({"resample": True}, r"resample must be a PIL filter number .* got True"),
    "zero size": ({"size": 0}, r"size\.height must be from 1 to 8192 pixels, got 0"),
    "negative size": ({"size": {"height": -1, "width": 8}}, r"size\.height must be from 1 to 8192 pixels, got -1"),
    "huge size": ({"size": 10**6}, rf"size\.height must be from 1 to {MAX_CONFIG_SIDE} pixels"),
    "size without width": ({"size": {"height": 8}}, r"size must be a number or \{height, width\}.*got keys"),
    "size by longest edge": ({"size": {"longest_edge": 8}}, r"size must be a number or \{height, width\}"),
    "size as a string": ({"size": "256"}, r"size must be an integer number of pixels, got '256'"),
    "fractional size": ({"size": 25.5}, r"size must be an integer number of pixels, got 25\.5"),
    "zero shortest edge": ({"size": {"shortest_edge": 0}}, r"size\.shortest_edge must be from 1 to 8192"),
    "zero crop": ({"crop_size": 0}, r"crop_size\.height must be from 1 to 8192 pixels, got 0"),
    "huge crop": ({"crop_size": {"height": 8, "width": 10**5}}, r"crop_size\.width must be from 1 to 8192"),
    "crop as a list": ({"crop_size": [8, 8]}, r"crop_size must be an integer number of pixels, got \[8, 8\]"),
    "zero std": ({"image_std": [0, 0, 0]}, r"image_std must be finite numbers above 0, got \[0\.0, 0\.0, 0\.0\]"),
    "negative std": ({"image_std": [0.5, -0.5, 0.5]}, r"image_std must be finite numbers above 0"),
    "scalar zero std": ({"image_std": 0}, r"image_std must be finite numbers above 0"),
    "infinite std": ({"image_std": [math.inf, 1, 1]}, r"image_std must be finite numbers above 0"),
    "two std values": ({"image_std": [0.5, 0.5]}, r"image_std must be a number or a list of 3 numbers"),
    "std as a string": ({"image_std": "0.5"}, r"image_std must be a number or a list of 3 numbers"),
    "std with a string": ({"image_std": [0.5, "x", 0.5]}, r"image_std must be a number, got 'x'"),
    "tiny std": ({"image_std": [1e-40, 1, 1]}, r"image_std is so small that normalised pixels overflow float32"),
    "nan mean": ({"image_mean": [math.nan, 0.5, 0.5]}, r"image_mean must be finite numbers"),
    "zero rescale": ({"rescale_factor": 0}, r"rescale_factor must be a finite number above 0, got 0"),
    "negative rescale": ({"rescale_factor": -1 / 255}, r"rescale_factor must be a finite number above 0"),
    "rescale as a string": ({"rescale_factor": "1/255"}, r"rescale_factor must be a number, got '1/255'"),
    "do_resize a string": ({"do_resize": "yes"}, r"do_resize must be true or false, got 'yes'"),
    "do_normalize a number": ({"do_normalize": 1}, r"do_normalize must be true or false, got 1"),
    "do_center_crop null": ({"do_center_crop": None}, r"do_center_crop must be true or false, got None"),
    "do_rescale a string": ({"do_rescale": "false"}, r"do_rescale must be true or false, got 'false'"),
    "shortest edge, no crop": (
        {"size": {"shortest_edge": 64}, "do_center_crop": False},
        r"without do_center_crop, only a resize to a fixed size",
    ),
    "no resize, no crop": ({"do_resize": False, "do_center_crop": False}, r"without do_center_crop"),
}


@pytest.mark.parametrize("case", list(BAD_PREPROCESS))
def test_preprocessor_config_validation_names_file_and_field(case: str) -> None:
    changes, message = BAD_PREPROCESS[case]
    with pytest.raises(CheckpointError, match=rf"^/m/preprocessor_config\.json: {message}") as caught:
        PreprocessConfig.from_dict({"size": 40, "crop_size": 32, **changes}, source="/m/preprocessor_config.json")
    print(f"{case}: {caught.value.message}")


def test_preprocessor_config_nulls_take_the_processor_defaults() -> None:
    cfg = PreprocessConfig.from_dict({"size": None, "crop_size": None, "image_mean": None, "resample": None})
    assert (cfg.resize_height, cfg.crop_height, cfg.resample, cfg.image_mean) == (256, 224, 3, (0.5, 0.5, 0.5))


def test_a_preprocessor_config_on_disk_is_named_by_path(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": 99}))
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/preprocessor_config\.json: resample must be"):
        PreprocessConfig.from_directory(tmp_path, default_size=224)
    (tmp_path / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json: expected a JSON object, got list"):
        PreprocessConfig.from_directory(tmp_path, default_size=224)
