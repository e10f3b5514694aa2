"""The runtimes behind the engine, in process: every checkpoint kind and writer exported to OpenVINO and ONNX
Runtime gives torch's float32 outputs within 1e-4, at any batch size; artefacts are cached and verified; ``auto``
serves an agreeing runtime and says why; a runtime that cannot export is skipped, never a failed load."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sys
from pathlib import Path

import httpx
import openvino as ov
import pytest
import torch

from harness.inputs import training_script
from service.engine.runner import Forward, Outputs, checkpoint_forward
from service.engine.runtimes import AUTO, ONNXRUNTIME, OPENVINO, TORCH, Runtime, RuntimeOptions
from service.engine.runtimes import openvino as ov_runtime
from service.engine.runtimes.cache import MANIFEST
from service.engine.runtimes.decisions import DECISIONS
from service.engine.runtimes.selection import PROBABILITY_TOLERANCE, measure, prepare_runtime
from service.errors import CheckpointError
from service.model.checkpoints import LoadedCheckpoint, cpu_supports_bf16
from service.model.prepare import load_for_serving
from service.model.preprocessing import Preprocessor
from service.settings import Settings
from tests.factories import hf_model, save_hf, save_timm
from tests.serving import free_port, image_bytes, serve_in_process

EXPORTED = (OPENVINO, ONNXRUNTIME)
TOLERANCE = 1e-4


def _load(path: Path) -> LoadedCheckpoint:
    return load_for_serving(path, device="cpu", dtype="float32")


def _prepare(checkpoint: LoadedCheckpoint, runtime: str, cache: Path, **options: object) -> Runtime:
    values: dict[str, object] = {"runtime": runtime, "dtype": "float32", "threads": 1, "cache_dir": cache,
                                 "measure_s": 0.05, "max_batch_size": 4, **options}  # fmt: skip
    return prepare_runtime(checkpoint, RuntimeOptions(**values), Preprocessor(checkpoint.preprocess))  # type: ignore[arg-type]


def _assert_close(got: Outputs, want: Outputs) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == torch.float32
        assert got[name].shape == value.shape, name
        assert torch.allclose(got[name], value, atol=TOLERANCE, rtol=0), (name, (got[name] - value).abs().max())


@pytest.mark.parametrize("runtime", EXPORTED)
@pytest.mark.parametrize("kind", ["distilled", "single_head", "vit", "mim", "bare", "timm"])
def test_an_exported_runtime_gives_torchs_float32_outputs(
    runtime: str, kind: str, pixel_values: torch.Tensor, tmp_path: Path
) -> None:
    if kind == "timm":  # a timm file names no head count: a width of 64 reads as one head
        model = hf_model("distilled", seed=3, hidden_size=64, num_attention_heads=1)
    else:
        model = hf_model(kind, seed=3)  # type: ignore[arg-type]
    path = save_timm(model, tmp_path / "timm.pth") if kind == "timm" else save_hf(model, tmp_path / kind)
    reference = _load(path)
    want = checkpoint_forward(reference)(list(pixel_values))
    served = _prepare(_load(path), runtime, tmp_path / "cache")
    assert (served.info.name, served.info.precision) == (runtime, "float32")
    assert "agrees with torch float32" in served.info.reason
    _assert_close(served.forward(list(pixel_values)), want)
    # the batch dimension is dynamic: one image, and more than the export's example batch
    _assert_close(served.forward([pixel_values[1]]), {k: v[1:2] for k, v in want.items()})
    five = [pixel_values[i % 3] for i in range(5)]
    _assert_close(served.forward(five), {k: v[[i % 3 for i in range(5)]] for k, v in want.items()})


@pytest.mark.parametrize("runtime", EXPORTED)
def test_the_torch_weights_are_freed_once_the_runtime_holds_its_own(
    runtime: str, distilled_dir: Path, tmp_path: Path
) -> None:
    checkpoint = _load(distilled_dir)
    parameters = checkpoint.num_parameters
    _prepare(checkpoint, runtime, tmp_path / "cache")
    assert all(p.device.type == "meta" for p in checkpoint.model.parameters())
    assert checkpoint.num_parameters == parameters  # still reported


@pytest.mark.parametrize("runtime", EXPORTED)
def test_a_second_load_reads_the_cache_and_a_damaged_entry_is_rebuilt(
    runtime: str, distilled_dir: Path, pixel_values: torch.Tensor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    want = checkpoint_forward(_load(distilled_dir))(list(pixel_values))
    caplog.set_level(logging.INFO, logger="deit_serve.runtimes")
    _prepare(_load(distilled_dir), runtime, cache)
    assert [r.message for r in caplog.records].count("runtime artefact exported to the cache") == 1
    (entry,) = [p for p in cache.iterdir() if (p / MANIFEST).is_file()]
    caplog.clear()
    again = _prepare(_load(distilled_dir), runtime, cache)
    messages = [r.message for r in caplog.records]
    assert "runtime artefact read from the cache" in messages
    assert "runtime artefact exported to the cache" not in messages
    _assert_close(again.forward(list(pixel_values)), want)

    # Flip bytes in the middle of the largest file (the weights): the manifest's digest no longer matches.
    weights = max((p for p in entry.iterdir() if p.name != MANIFEST), key=lambda p: p.stat().st_size)
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    weights.write_bytes(bytes(data))
    caplog.clear()
    rebuilt = _prepare(_load(distilled_dir), runtime, cache)
    records = caplog.records
    assert any(r.message.startswith("runtime cache entry is damaged") for r in records)
    assert any(r.message == "runtime artefact exported to the cache" for r in records)
    _assert_close(rebuilt.forward(list(pixel_values)), want)

    # A manifest that is not JSON is damage too, not a crash.
    (entry / MANIFEST).write_text("{not json")
    caplog.clear()
    _prepare(_load(distilled_dir), runtime, cache)
    assert any("manifest unreadable" in r.message for r in caplog.records)


def test_auto_serves_an_agreeing_runtime_and_says_why(
    distilled_dir: Path, pixel_values: torch.Tensor, tmp_path: Path
) -> None:
    want = checkpoint_forward(_load(distilled_dir))(list(pixel_values))
    served = _prepare(_load(distilled_dir), AUTO, tmp_path / "cache")  # float32: the same candidates on any CPU
    assert served.info.name in (TORCH, *EXPORTED)
    reason = served.info.reason
    assert reason.startswith("auto: fastest at batch 4 on 1 threads: ")
    for runtime in (TORCH, *EXPORTED):  # every installed runtime was measured and is named with its speed
        assert f"{runtime} float32 " in reason
    assert "img/s" in reason
    assert "agrees with torch float32 (top-1 equal, max |Δp|" in reason
    _assert_close(served.forward(list(pixel_values)), want)


def _artefact_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The runtimes whose artefact a load read or exported, by the cache's log lines."""
    wanted = ("runtime artefact read from the cache", "runtime artefact exported to the cache")
    return sorted(str(getattr(r, "runtime", "")).split()[0] for r in caplog.records if r.getMessage() in wanted)


def test_auto_keeps_its_choice_and_the_next_start_builds_that_runtime_alone(
    distilled_dir: Path, pixel_values: torch.Tensor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="deit_serve.runtimes")
    first = _prepare(_load(distilled_dir), AUTO, cache)
    assert first.info.reason.startswith("auto: fastest at batch 4 on 1 threads: ")
    assert _artefact_events(caplog) == sorted(EXPORTED)  # every candidate built
    (kept,) = (cache / DECISIONS).iterdir()
    assert json.loads(kept.read_text())["runtime"] == first.info.name

    caplog.clear()
    again = _prepare(_load(distilled_dir), AUTO, cache)
    assert (again.info.name, again.info.precision) == (first.info.name, first.info.precision)
    assert again.info.reason.startswith("auto, as measured at ")
    assert again.info.reason.endswith(first.info.reason.removeprefix("auto: "))
    assert _artefact_events(caplog) == ([] if first.info.name == TORCH else [first.info.name])  # that one alone
    want = checkpoint_forward(_load(distilled_dir))(list(pixel_values))
    _assert_close(again.forward(list(pixel_values)), want)

    caplog.clear()
    other = _prepare(_load(distilled_dir), AUTO, cache, threads=2)  # other options: a choice of their own
    assert other.info.reason.startswith("auto: fastest at batch 4 on 2 threads: ")
    assert len(list((cache / DECISIONS).iterdir())) == 2


@pytest.mark.parametrize(
    "kept",
    [
        "{not json",
        json.dumps({"runtime": "openvino"}),  # fields missing
        json.dumps({"runtime": "onnxruntime", "precision": "float16", "reason": "r", "measured_at": "t"}),
        json.dumps({"runtime": "tensorrt", "precision": "float32", "reason": "r", "measured_at": "t"}),
    ],
)
def test_a_kept_choice_that_is_unreadable_or_cannot_serve_is_measured_again(
    kept: str, distilled_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    _prepare(_load(distilled_dir), AUTO, cache)
    (path,) = (cache / DECISIONS).iterdir()
    path.write_text(kept)
    caplog.set_level(logging.WARNING, logger="deit_serve.runtimes")
    again = _prepare(_load(distilled_dir), AUTO, cache)
    assert again.info.reason.startswith("auto: fastest at batch 4 on 1 threads: ")  # measured, not taken on trust
    assert any(r.getMessage().startswith("runtime decision") for r in caplog.records)
    assert json.loads(path.read_text())["reason"] == again.info.reason  # the new measurement kept in its place


def test_auto_times_its_candidates_in_rotating_rounds_after_one_untimed_pass_each() -> None:
    """On a clock that each pass advances by its candidate's cost: one untimed pass each, then rounds in rotating
    order until the budget (per candidate) is spent, each candidate's speed from its own passes."""
    now = [0.0]
    cost = {"torch": 1.0, "openvino": 2.0, "onnxruntime": 4.0}
    calls: list[str] = []

    def run(name: str) -> None:
        calls.append(name)
        now[0] += cost[name]

    speeds = measure(list(cost), 8, budget_s=7.0, run=run, clock=lambda: now[0])
    assert calls[:3] == ["torch", "openvino", "onnxruntime"]  # the untimed passes
    assert calls[3:] == [  # a round takes 7 of the 3 × 7 budget: three rounds, each starting one further on
        "torch", "openvino", "onnxruntime",
        "openvino", "onnxruntime", "torch",
        "onnxruntime", "torch", "openvino",
    ]  # fmt: skip
    assert speeds == [8.0, 4.0, 2.0]


def test_auto_skips_a_runtime_that_cannot_export_and_still_loads(
    distilled_dir: Path, pixel_values: torch.Tensor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the cache directory should be")
    caplog.set_level(logging.WARNING, logger="deit_serve.runtimes")
    checkpoint = _load(distilled_dir)
    want = checkpoint_forward(checkpoint)(list(pixel_values))
    served = _prepare(checkpoint, AUTO, blocked)
    assert served.info.name == TORCH
    assert served.info.reason == "auto: only torch float32 available"
    skipped = [r for r in caplog.records if r.message.startswith("runtime skipped: ")]
    assert {getattr(r, "runtime", None) for r in skipped} == set(EXPORTED)
    assert all("export failed" in r.message for r in skipped)
    _assert_close(served.forward(list(pixel_values)), want)
    assert all(p.device.type == "cpu" for p in checkpoint.model.parameters())  # torch serves: its weights stay


@pytest.mark.parametrize("runtime", EXPORTED)
def test_a_runtime_asked_for_by_name_that_cannot_export_fails_the_load_naming_why(
    runtime: str, distilled_dir: Path, tmp_path: Path
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    with pytest.raises(CheckpointError, match=rf"--runtime {runtime}: .*export failed"):
        _prepare(_load(distilled_dir), runtime, blocked)


@pytest.mark.parametrize(
    ("runtime", "dtype", "message"),
    [
        (ONNXRUNTIME, "bfloat16", "onnxruntime serves float32"),
        (OPENVINO, "float16", "openvino serves float32 or bfloat16"),
    ],
)
def test_a_precision_a_runtime_does_not_serve_is_refused_by_name(
    runtime: str, dtype: str, message: str, distilled_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match=message):
        _prepare(_load(distilled_dir), runtime, tmp_path / "cache", dtype=dtype)


def test_onnxruntime_int8_quantizes_its_own_export_and_agrees_on_top1(
    distilled_dir: Path, pixel_values: torch.Tensor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    served = _prepare(_load(distilled_dir), ONNXRUNTIME, tmp_path / "cache", quantize="int8")
    # The quantizer's root-logger lines (one per tensor, and advice to pre-process) stay out of the service's log.
    assert [r.getMessage() for r in caplog.records if r.name == "root" and "onnxruntime" in r.pathname] == []
    assert "runtime artefact exported to the cache" in caplog.messages  # the export (and its quantization) ran here
    assert (served.info.name, served.info.precision) == (ONNXRUNTIME, "int8")
    assert "agrees with torch float32" in served.info.reason
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if (p / MANIFEST).is_file()]
    assert sorted(p.name for p in entry.iterdir()) == [MANIFEST, "model.int8.onnx"]
    want = checkpoint_forward(_load(distilled_dir))(list(pixel_values))
    got = served.forward(list(pixel_values))
    assert torch.equal(got["logits"].argmax(-1), want["logits"].argmax(-1))


def test_auto_with_int8_measures_every_runtimes_int8(
    distilled_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="deit_serve.runtimes")
    served = _prepare(_load(distilled_dir), AUTO, tmp_path / "cache", dtype="auto", quantize="int8")
    assert served.info.precision == "int8"
    skipped = {getattr(r, "runtime", ""): r.message for r in caplog.records if r.message.startswith("runtime skipped")}
    # Each int8 candidate was measured, or (int8 kernels differ by CPU) skipped for disagreeing, with its reason.
    for label in ("torch int8", "openvino int8", "onnxruntime int8"):
        assert f"{label} " in served.info.reason or label in skipped
    assert set(skipped) <= {"torch int8", "openvino int8", "onnxruntime int8"}  # none unavailable


def test_openvino_serves_bfloat16_only_where_the_cpu_has_it_natively(distilled_dir: Path, tmp_path: Path) -> None:
    """Detected from the CPU's flags, never assumed: on AVX512-BF16/AMX it serves bf16 within bf16's tolerance."""
    if not cpu_supports_bf16():
        with pytest.raises(CheckpointError, match="openvino serves bfloat16 only on CPUs with native bf16"):
            _prepare(_load(distilled_dir), OPENVINO, tmp_path / "cache", dtype="bfloat16")
        return
    served = _prepare(_load(distilled_dir), OPENVINO, tmp_path / "cache", dtype="bfloat16")
    assert (served.info.name, served.info.precision) == (OPENVINO, "bfloat16")


# --- int8 of the exported runtimes (OpenVINO: NNCF weight compression) on the trained model's held-out digits ---

DIGITS = Path(__file__).resolve().parent.parent / "service" / "data" / "model_store" / "deit-tiny-digits"
ACCURACY_POINTS = 0.5  # held-out accuracy of every runtime and precision served, within this of float32's
INT8_AGREEMENT = 0.98  # held-out digits whose top-1 is float32 torch's: int8 may flip close calls, not many


@functools.cache
def _held_out() -> tuple[torch.Tensor, torch.Tensor]:
    train = training_script()
    return train.held_out_inputs(train.held_out_split(), Preprocessor(_load(DIGITS).preprocess))


def _logits(forward: Forward, inputs: torch.Tensor) -> torch.Tensor:
    return torch.cat([forward(list(inputs[i : i + 64]))["logits"] for i in range(0, len(inputs), 64)])


@pytest.mark.parametrize("runtime", EXPORTED)
def test_int8_answers_the_held_out_digits_like_float32(runtime: str, tmp_path: Path) -> None:
    """Each runtime's own int8 (NNCF's int8 weight compression for OpenVINO, dynamic quantization for ONNX
    Runtime), held to the same bar: held-out accuracy within 0.5 points of float32 torch's, and top-1 equal to it
    on all but a few close calls, and every probability within int8's tolerance of the runtime choice (5e-2)."""
    inputs, labels = _held_out()
    want = _logits(checkpoint_forward(_load(DIGITS)), inputs)
    served = _prepare(_load(DIGITS), runtime, tmp_path / "cache", quantize="int8")
    assert (served.info.name, served.info.precision) == (runtime, "int8")
    assert "agrees with torch float32 on the probes (top-1 equal" in served.info.reason
    got = _logits(served.forward, inputs)
    accuracy = {
        name: 100 * float((x.argmax(-1) == labels).float().mean()) for name, x in (("fp32", want), ("int8", got))
    }
    agreement = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    gap = float((got.softmax(-1) - want.softmax(-1)).abs().max())
    print(f"{runtime} int8 on {len(labels)} held-out digits: accuracy {accuracy}, top-1 agreement {agreement:.3f}, "
          f"max |Δp| {gap:.2e}")  # fmt: skip
    assert abs(accuracy["int8"] - accuracy["fp32"]) <= ACCURACY_POINTS, accuracy
    assert agreement >= INT8_AGREEMENT, agreement
    assert 1e-4 < gap <= PROBABILITY_TOLERANCE["int8"]  # quantized (not the float32 model again), and close


def test_openvino_int8_is_nncf_compressed_ir_cached_apart_from_float32_and_not_compressed_twice(
    distilled_dir: Path,
    pixel_values: torch.Tensor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = tmp_path / "cache"
    compressed: list[object] = []
    compress = ov_runtime.compress_weights

    def counting(converted: object) -> object:
        compressed.append(converted)
        return compress(converted)

    monkeypatch.setattr(ov_runtime, "compress_weights", counting)
    caplog.set_level(logging.INFO, logger="deit_serve.runtimes")
    first = _prepare(_load(distilled_dir), OPENVINO, cache, quantize="int8")
    assert len(compressed) == 1
    (entry,) = [p for p in cache.iterdir() if (p / MANIFEST).is_file()]
    assert sorted(p.name for p in entry.iterdir()) == [MANIFEST, "model.int8.bin", "model.int8.xml"]
    ir = ov.Core().read_model(entry / "model.int8.xml")
    weights = [op for op in ir.get_ops() if op.get_type_name() == "Constant" and len(op.get_output_shape(0)) == 2]
    int8 = [op for op in weights if op.get_output_element_type(0) in (ov.Type.u8, ov.Type.i8)]
    assert (
        len(int8) >= 4 * _load(distilled_dir).config.num_hidden_layers
    )  # q/k/v (or fused), output, and both MLP Linears per block

    caplog.clear()
    monkeypatch.setitem(sys.modules, "nncf", None)  # a start that finds its int8 IR cached never imports NNCF
    again = _prepare(_load(distilled_dir), OPENVINO, cache, quantize="int8")
    assert len(compressed) == 1  # read from the cache, not compressed again
    messages = [r.message for r in caplog.records]
    assert "runtime artefact read from the cache" in messages
    assert "runtime artefact exported to the cache" not in messages
    assert torch.equal(again.forward(list(pixel_values))["logits"], first.forward(list(pixel_values))["logits"])

    _prepare(_load(distilled_dir), OPENVINO, cache)  # float32: its own entry, beside int8's
    entries = sorted(sorted(p.name for p in e.iterdir()) for e in cache.iterdir() if (e / MANIFEST).is_file())
    assert entries == [[MANIFEST, "model.bin", "model.xml"], [MANIFEST, "model.int8.bin", "model.int8.xml"]]
    assert len(compressed) == 1


def test_openvino_int8_without_nncf_is_unavailable_by_name(
    distilled_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "nncf", None)  # `import nncf` raises ImportError, as when it is not installed
    with pytest.raises(
        CheckpointError, match=r"--runtime openvino: openvino int8 needs nncf.*deit-serve\[openvino-int8\]"
    ):
        _prepare(_load(distilled_dir), OPENVINO, tmp_path / "cache", quantize="int8")
    caplog.set_level(logging.WARNING, logger="deit_serve.runtimes")
    served = _prepare(_load(distilled_dir), AUTO, tmp_path / "cache", dtype="auto", quantize="int8")
    assert served.info.precision == "int8"
    (skipped,) = [r for r in caplog.records if getattr(r, "runtime", None) == OPENVINO]
    assert skipped.message.startswith("runtime skipped: openvino int8 needs nncf")
    assert "openvino int8" not in served.info.reason


@pytest.mark.parametrize("runtime", EXPORTED)
def test_a_start_warms_up_through_the_runtime_at_every_batch_size(
    runtime: str, tiny_store: Path, tmp_path: Path
) -> None:
    """Warm-up runs the probe through the exported model at batch 1 and at the largest batch, on every forward
    thread, checking each output's shape and finiteness: a start only becomes ready once the runtime passed it."""
    settings = Settings.model_validate({
        "model_store": tiny_store, "runtime": runtime, "runtime_cache": tmp_path / "cache", "warmup": True,
        "device": "cpu", "dtype": "float32", "max_batch_size": 8, "forward_workers": 2, "torch_threads": 2,
        "port": free_port(),
    })  # fmt: skip
    with serve_in_process(settings) as server:
        (info,) = httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"]
        assert info["runtime"]["name"] == runtime
        files = {"file": ("red.png", image_bytes(), "image/png")}
        assert httpx.post(f"{server.url}/classify", files=files, timeout=30).status_code == 200


@pytest.mark.parametrize("runtime", EXPORTED)
def test_the_same_weights_at_another_input_size_get_their_own_artefact(
    runtime: str, distilled_dir: Path, tmp_path: Path
) -> None:
    """The export is fixed to the model's input size, which comes from the preprocessor, not from the weights: a
    checkpoint with the same weights and another crop gets an artefact of its own, and each answers as torch does."""
    other = tmp_path / "other-crop"
    shutil.copytree(distilled_dir, other)
    crop = {"size": 40, "crop_size": 36, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (other / "preprocessor_config.json").write_text(json.dumps(crop))
    cache = tmp_path / "cache"
    sizes = []
    for directory in (distilled_dir, other):
        size = _load(directory).preprocess.output_size
        sizes.append(size)
        pixels = list(torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3)))
        want = checkpoint_forward(_load(directory))(pixels)
        _assert_close(_prepare(_load(directory), runtime, cache).forward(pixels), want)
    assert sizes[0] != sizes[1]
    assert len([p for p in cache.iterdir() if (p / MANIFEST).is_file()]) == 2
