"""``--quantize int8``: the encoder's Linears become dynamic int8, the model still answers like float32, and
a real server process serves it; combinations that cannot work are refused at start-up with a clear message."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from service.cli import main
from service.errors import CheckpointError
from service.model.checkpoints import LoadedCheckpoint
from service.model.decoding import decode_image
from service.model.prepare import load_for_serving
from service.model.preprocessing import Preprocessor
from service.model.quantization import cpu_has_int8_dot_product, int8_engine, is_int8
from service.settings import Settings
from tests.profiles import DEMO_KEY, DEMO_KEYED
from tests.serving import DEMO_MODEL, ServerProcess, SharedServers, run_server

SAMPLES = sorted((DEMO_MODEL / "samples").glob("*.png"))
MAX_PIXELS = Settings.model_fields["max_image_pixels"].default

pytestmark = pytest.mark.skipif(int8_engine() is None, reason="this torch build has no quantized CPU engine")


def _load(quantize: str, **overrides: object) -> LoadedCheckpoint:
    return load_for_serving(DEMO_MODEL, device="cpu", quantize=quantize, **overrides)  # type: ignore[arg-type]


def _samples(checkpoint: LoadedCheckpoint) -> torch.Tensor:
    preprocessor = Preprocessor(checkpoint.preprocess)
    return torch.stack([preprocessor(decode_image(p.read_bytes(), MAX_PIXELS)) for p in SAMPLES])


def test_int8_replaces_every_encoder_linear_and_keeps_the_heads_float32() -> None:
    checkpoint = _load("int8")
    model = checkpoint.model
    encoder = model.backbone.encoder
    assert is_int8(model)
    assert not any(isinstance(m, nn.Linear) for m in encoder.modules()), "an encoder Linear stayed float32"
    layers = len(encoder.layer)
    quantized = [m for m in encoder.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    # Four Linears per block once q/k/v are fused: qkv, attention output, MLP in, MLP out.
    assert len(quantized) == 4 * layers
    assert isinstance(model.cls_classifier, nn.Linear)
    assert model.cls_classifier.weight.dtype == torch.float32
    assert checkpoint.dtype == torch.float32


def test_int8_agrees_with_float32_on_the_demo_samples() -> None:
    fp32, int8 = _load("none", dtype="float32"), _load("int8")
    inputs = _samples(fp32)
    with torch.inference_mode():
        p, q = torch.softmax(fp32.model(inputs), -1), torch.softmax(int8.model(inputs), -1)
    assert torch.equal(p.argmax(-1), q.argmax(-1))
    gap = (p - q).abs().max().item()
    assert 0 < gap < 0.1, gap  # quantized (not the float32 model again), and close


def test_int8_loads_float32_weights_when_dtype_is_auto() -> None:
    assert _load("int8", dtype="auto").dtype == torch.float32


def test_int8_with_a_half_precision_dtype_is_an_invalid_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEIT_MODEL_STORE", str(DEMO_MODEL.parent))
    with pytest.raises(SystemExit) as exit_info:
        main(["--quantize", "int8", "--dtype", "bfloat16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "quantize int8" in err, err
    assert "bfloat16" in err, err


def test_cuda_graphs_on_the_cpu_is_refused_by_name() -> None:
    with pytest.raises(CheckpointError, match="--cuda-graphs needs a CUDA device"):
        _load("none", cuda_graphs=True)


def test_int8_dot_product_detection_reads_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text(encoding="utf-8").split()
    assert cpu_has_int8_dot_product() == any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


@pytest.fixture(scope="module")
def by_quantize(
    tmp_path_factory: pytest.TempPathFactory, servers: SharedServers
) -> Iterator[dict[str, tuple[ServerProcess, dict[str, str]]]]:
    """A float32 server on the demo model (the shared ``DEMO_KEYED``, with its key) and an int8 one of this
    module's own, each with the headers its requests carry."""
    args = ["--quantize", "int8", "--dtype", "float32"]
    with run_server(DEMO_MODEL.parent, tmp_path_factory.mktemp("int8"), args=args) as int8:
        none = servers.get(DEMO_MODEL.parent, DEMO_KEYED)
        yield {"none": (none, {"X-API-Key": DEMO_KEY}), "int8": (int8, {})}


def test_an_int8_server_answers_top1_like_float32_on_the_demo_samples(
    by_quantize: dict[str, tuple[ServerProcess, dict[str, str]]],
) -> None:
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in SAMPLES]
    answers = {}
    for quantize, (server, headers) in by_quantize.items():
        response = httpx.post(f"{server.url}/classify", files=files, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        answers[quantize] = [r["predictions"][0]["label"] for r in response.json()["results"]]
    assert answers["int8"] == answers["none"]
    assert answers["int8"] == [p.name[0] for p in SAMPLES]
    models = {
        q: httpx.get(f"{server.url}/v1/models", headers=headers).json()["models"]
        for q, (server, headers) in by_quantize.items()
    }
    assert [m["dtype"] for m in models["int8"]] == ["float32"]
    assert models["int8"][0]["parameters"] == models["none"][0]["parameters"] > 100_000
    assert "Traceback" not in by_quantize["int8"][0].log()
