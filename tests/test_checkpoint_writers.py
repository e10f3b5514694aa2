"""Checkpoints from writers beyond ``save_pretrained``: transformers ≥ 5 state dicts saved by hand, TensorFlow
``tf_model.h5`` and timm (DeiT, DeiT III), each compared with the writing library's own outputs.

The TensorFlow and timm fixtures under tests/fixtures/ were written by those libraries themselves (random weights,
tiny configs) with scripts/make_tf_fixtures.py and scripts/make_timm_fixtures.py, which run in venvs of their own.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import h5py
import httpx
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import Tensor

from service.errors import CheckpointError
from service.model.architecture import Architecture
from service.model.checkpoints import load_checkpoint
from service.model.decoding import decode_image
from service.model.deit import LayerScale, build_deit
from service.model.preprocessing import Preprocessor
from service.model.timm import timm_to_hf
from tests.factories import HFKind, hf_model
from tests.profiles import ZOO_AUTH, ZOO_WRITERS, hand_saved, model_zoo, zoo_server
from tests.serving import ServerProcess, SharedServers, noise_image_bytes

FIXTURES = Path(__file__).parent / "fixtures"
TF_KINDS = sorted(p.name for p in (FIXTURES / "tf").iterdir() if p.is_dir())
TIMM_PARITY = sorted(p.stem for p in (FIXTURES / "timm").glob("*.pth"))
TIMM_REFUSED = sorted(p.stem for p in (FIXTURES / "timm" / "refused").glob("*.pth"))
ATOL = 1e-4


def _max_diff(ours: Tensor, reference: Tensor | np.ndarray[Any, Any]) -> float:
    ref = torch.from_numpy(reference) if isinstance(reference, np.ndarray) else reference
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((ours.float() - ref.float()).abs().max())


def _assert_nontrivial(reference: np.ndarray[Any, Any]) -> None:
    """A reference near zero or constant would let a broken model pass."""
    assert float(np.abs(reference).max()) > 0.1
    assert float(reference.std()) > 0.05


# --- transformers ≥ 5: state dicts saved by hand carry the in-memory names -------------------------------------


def _reference_output(model: Any, kind: HFKind, x: Tensor) -> Tensor:
    with torch.inference_mode():
        out = model(x)
    if kind == "bare":
        return out.last_hidden_state
    if kind == "mim":
        return out.reconstruction
    return out.logits


def test_installed_transformers_names_its_modules_differently_in_memory() -> None:
    """The premise of the next tests: transformers ≥ 5's own state dict differs from what it saves."""
    assert int(transformers.__version__.split(".")[0]) >= 5
    keys = set(hf_model("distilled").state_dict())
    assert "deit.layers.0.attention.q_proj.weight" in keys
    assert "deit.layers.0.mlp.fc1.weight" in keys
    assert not any(".encoder.layer." in k for k in keys)


@pytest.mark.parametrize("suffix", [".bin", ".pth", ".safetensors"])
@pytest.mark.parametrize("kind", ["distilled", "single_head", "vit", "bare", "mim"])
def test_transformers5_state_dict_matches_transformers(
    kind: HFKind, suffix: str, tmp_path: Path, pixel_values: Tensor
) -> None:
    model, _ = hand_saved(kind, tmp_path / "ckpt", suffix)
    checkpoint = load_checkpoint(tmp_path / "ckpt")
    reference = _reference_output(model, kind, pixel_values)
    with torch.inference_mode():
        diff = _max_diff(checkpoint.model(pixel_values), reference)
    print(f"parity transformers5-{kind}{suffix}: max |ours - transformers| = {diff:.2e}")
    assert diff < ATOL
    if kind == "bare":
        with torch.inference_mode():
            pooled = model(pixel_values).pooler_output
            assert _max_diff(checkpoint.model.pooled(pixel_values), pooled) < ATOL


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_transformers5_state_dict_missing_tensor_is_named(suffix: str, tmp_path: Path) -> None:
    model, path = hand_saved("distilled", tmp_path / "ckpt", suffix)
    state = {k: v for k, v in model.state_dict().items() if k != "deit.layers.1.attention.k_proj.weight"}
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"{path.name}.*missing tensors.*layer\.1\.attention\.attention\.key"):
        load_checkpoint(tmp_path / "ckpt")


def test_transformers5_state_dict_unexpected_tensor_is_named(tmp_path: Path) -> None:
    model, path = hand_saved("single_head", tmp_path / "ckpt", ".pth")
    state = dict(model.state_dict())
    state["deit.layers.0.attention.rotary.weight"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"model\.pth.*unexpected tensors.*'deit\.layers\.0\.attention\.rotary"):
        load_checkpoint(tmp_path / "ckpt")


def test_mixed_old_and_new_names_for_one_tensor_are_refused(tmp_path: Path) -> None:
    model, path = hand_saved("distilled", tmp_path / "ckpt", ".pth")
    state = dict(model.state_dict())
    state["deit.encoder.layer.0.attention.attention.query.weight"] = state["deit.layers.0.attention.q_proj.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"model\.pth.*both map to 'deit\.encoder\.layer\.0\.attention"):
        load_checkpoint(tmp_path / "ckpt")


def test_two_weight_files_beside_a_config_are_ambiguous(tmp_path: Path) -> None:
    hand_saved("distilled", tmp_path / "ckpt", ".pth")
    shutil.copy(tmp_path / "ckpt" / "model.pth", tmp_path / "ckpt" / "model-copy.pt")
    with pytest.raises(CheckpointError, match=r"exactly one .*found \['model-copy\.pt', 'model\.pth'\]"):
        load_checkpoint(tmp_path / "ckpt")


# --- TensorFlow tf_model.h5 --------------------------------------------------------------------------------


def _tf_outputs(kind: str) -> dict[str, np.ndarray[Any, Any]]:
    with np.load(FIXTURES / "tf" / kind / "outputs.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("kind", TF_KINDS)
def test_tf_h5_matches_tensorflow(kind: str) -> None:
    outputs = _tf_outputs(kind)
    x = torch.from_numpy(outputs["pixel_values"])
    checkpoint = load_checkpoint(FIXTURES / "tf" / kind)
    assert checkpoint.source == FIXTURES / "tf" / kind
    model = checkpoint.model
    reference = outputs["logits"] if "logits" in outputs else outputs["last_hidden_state"]
    _assert_nontrivial(reference)
    with torch.inference_mode():
        diff = _max_diff(model(x), reference)
        print(f"parity tf-{kind}: max |ours - TensorFlow| = {diff:.2e}")
        assert diff < ATOL
        if "cls_logits" in outputs:
            cls_logits, dist_logits = model.head_logits(x)
            assert _max_diff(cls_logits, outputs["cls_logits"]) < ATOL
            assert _max_diff(dist_logits, outputs["distillation_logits"]) < ATOL
        if "pooler_output" in outputs:
            _assert_nontrivial(outputs["pooler_output"])
            assert checkpoint.config.add_pooling_layer
            assert _max_diff(model.pooled(x), outputs["pooler_output"]) < ATOL


@pytest.mark.parametrize("kind", TF_KINDS)
def test_tf_h5_equals_its_pytorch_twin_and_transformers(kind: str) -> None:
    """The twin holds the same weights as transformers' own TF→PyTorch conversion names and lays them out."""
    directory = FIXTURES / "tf" / kind
    x = torch.from_numpy(_tf_outputs(kind)["pixel_values"])
    from_h5 = load_checkpoint(directory)
    twin = load_checkpoint(directory / "pytorch")
    assert from_h5.config == twin.config
    for key, value in twin.model.state_dict().items():
        assert torch.equal(from_h5.model.state_dict()[key], value), key
    arch = json.loads((directory / "config.json").read_text())["architectures"][0]
    reference_model = getattr(transformers, arch).from_pretrained(directory / "pytorch", attn_implementation="eager")
    with torch.inference_mode():
        out = reference_model.eval()(x)
        reference = out.logits if hasattr(out, "logits") else out.last_hidden_state
        diff = _max_diff(from_h5.model(x), reference)
    print(f"parity tf-{kind}: max |ours from .h5 - transformers from its TF conversion| = {diff:.2e}")
    assert diff < ATOL


def _copy_tf(kind: str, tmp_path: Path) -> Path:
    directory = tmp_path / kind
    shutil.copytree(FIXTURES / "tf" / kind, directory, ignore=shutil.ignore_patterns("pytorch"))
    return directory


def test_tf_h5_missing_weight_is_named(tmp_path: Path) -> None:
    directory = _copy_tf("deit_with_teacher", tmp_path)
    with h5py.File(directory / "tf_model.h5", "r+") as f:
        group = f["deit"]
        names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
        dropped = next(n for n in names if "layer_._1/attention/attention/key/kernel" in n)
        group.attrs["weight_names"] = [n.encode() for n in names if n != dropped]
        del group[dropped]
    missing = r"'deit\.encoder\.layer\.1\.attention\.attention\.key\.weight'"
    with pytest.raises(CheckpointError, match=rf"tf_model\.h5.*missing tensors.*{missing}"):
        load_checkpoint(directory)


def test_tf_h5_with_a_head_of_another_model_is_refused(tmp_path: Path) -> None:
    """A ViT classifier's weights under a distilled DeiT's config: strict, named, not half-loaded."""
    directory = _copy_tf("deit_with_teacher", tmp_path)
    shutil.copy(FIXTURES / "tf" / "vit_classifier" / "tf_model.h5", directory / "tf_model.h5")
    expected = (
        r"tf_model\.h5: does not match .*missing tensors.*'cls_classifier\.weight'.*unexpected tensors.*'classifier"
    )
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(directory)


def test_h5_that_is_not_keras_weights_is_refused(tmp_path: Path) -> None:
    directory = _copy_tf("deit_classifier", tmp_path)
    with h5py.File(directory / "tf_model.h5", "w") as f:
        f["data"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(CheckpointError, match=r"tf_model\.h5: not a Keras weights file"):
        load_checkpoint(directory)
    (directory / "tf_model.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(CheckpointError, match=r"tf_model\.h5: not a readable HDF5 file"):
        load_checkpoint(directory)


def test_h5_without_config_is_refused_with_what_to_add(tmp_path: Path) -> None:
    path = tmp_path / "tf_model.h5"
    shutil.copy(FIXTURES / "tf" / "deit_classifier" / "tf_model.h5", path)
    with pytest.raises(CheckpointError, match=r"need their config\.json beside them"):
        load_checkpoint(path)


def test_h5_without_h5py_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)  # what `import h5py` meets where it is not installed
    with pytest.raises(CheckpointError, match=r"needs h5py.*deit-serve\[tf\]"):
        load_checkpoint(FIXTURES / "tf" / "deit_classifier")


# --- timm: DeiT and DeiT III .pth ----------------------------------------------------------------------------


def _timm_fixture(name: str) -> tuple[Path, dict[str, np.ndarray[Any, Any]]]:
    with np.load(FIXTURES / "timm" / f"{name}.npz") as data:
        return FIXTURES / "timm" / f"{name}.pth", {k: data[k] for k in data.files}


@pytest.mark.parametrize("name", TIMM_PARITY)
def test_timm_checkpoint_matches_timm(name: str) -> None:
    path, outputs = _timm_fixture(name)
    checkpoint = load_checkpoint(path, num_heads=int(outputs["num_heads"]))
    config = checkpoint.config
    assert config.layer_scale == name.startswith("deit3")
    assert config.prefix_position_embeddings != name.startswith("deit3")
    assert config.has_distillation_token == ("distilled" in name)
    assert (config.architecture is Architecture.BARE) == name.endswith("_backbone")
    x = torch.from_numpy(outputs["pixel_values"])
    assert config.image_size == x.shape[-1]
    _assert_nontrivial(outputs["features"])
    with torch.inference_mode():
        features = checkpoint.model.backbone(x)
        diffs = {"features": _max_diff(features, outputs["features"])}
        # timm's pre-logits: the CLS token, or for the distilled model the mean of the CLS and distillation tokens.
        tokens = features[:, : config.num_prefix_tokens].mean(dim=1)
        diffs["pre_logits"] = _max_diff(tokens, outputs["pre_logits"])
        if config.architecture.classifies:
            _assert_nontrivial(outputs["logits"])
            diffs["logits"] = _max_diff(checkpoint.model(x), outputs["logits"])
    print(f"parity timm-{name}: " + ", ".join(f"max |ours - timm| {k} = {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) < ATOL


def test_deit3_layer_scale_matters() -> None:
    """With the layer scales left at one the output is far off timm's: the parity test above can fail."""
    path, outputs = _timm_fixture("deit3_small_patch16_224")
    model = load_checkpoint(path, num_heads=int(outputs["num_heads"])).model
    x = torch.from_numpy(outputs["pixel_values"])
    with torch.inference_mode():
        assert _max_diff(model(x), outputs["logits"]) < ATOL
        for layer in model.backbone.encoder.layer:
            for scale in (layer.layer_scale1, layer.layer_scale2):
                assert isinstance(scale, LayerScale)
                scale.lambda1.fill_(1.0)
        assert _max_diff(model(x), outputs["logits"]) > 1e-2


@pytest.mark.parametrize("feature", TIMM_REFUSED)
def test_timm_feature_we_do_not_implement_is_refused_by_name(feature: str) -> None:
    words = {"qk_norm": "qk_norm", "reg_tokens": "reg_tokens", "fc_norm": "fc_norm", "norm_pre": "pre_norm",
             "attn_pool": "global_pool='map'", "scale_mlp_norm": "scale_mlp_norm",
             "no_class_token": "class_token=False"}  # fmt: skip
    path = FIXTURES / "timm" / "refused" / f"{feature}.pth"
    with pytest.raises(CheckpointError, match=rf"{feature}\.pth: timm checkpoint uses features .*{words[feature]}"):
        load_checkpoint(path, num_heads=2)


def test_timm_width_without_known_head_count_needs_num_heads() -> None:
    path, _ = _timm_fixture("deit_tiny_patch16_224")
    with pytest.raises(CheckpointError, match=r"width 16 does not say how many attention heads.*pass num_heads"):
        load_checkpoint(path)


def _full_size() -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((FIXTURES / "timm" / "full_size_keys.json").read_text())
    return manifest


@pytest.mark.parametrize("headless", [False, True])
@pytest.mark.parametrize("variant", sorted(_full_size()))
def test_full_size_timm_names_and_shapes_are_accepted(variant: str, headless: bool) -> None:
    """Every released timm DeiT / DeiT III layout, at full size (shapes only, on ``meta``), with or without head."""
    info = _full_size()[variant]
    state = {
        k: torch.empty(shape, device="meta")
        for k, shape in info["shapes"].items()
        if not (headless and k.startswith("head"))
    }
    converted, config = timm_to_hf(state)
    assert config.num_attention_heads == info["num_heads"]
    assert [config.image_size] * 2 == info["img_size"]
    assert config.layer_norm_eps == info["layer_norm_eps"]
    assert config.layer_scale == variant.startswith("deit3")
    expected_arch = (
        Architecture.BARE
        if headless
        else Architecture.DISTILLED
        if info["class"] == "VisionTransformerDistilled"
        else Architecture.SINGLE_HEAD
    )
    assert config.architecture is expected_arch
    with torch.device("meta"):
        model = build_deit(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


# --- through the service: a real server process loads each writer's checkpoint ---------------------------------


@pytest.fixture(scope="module")
def writers_store(servers: SharedServers) -> Path:
    """The store of the ``ZOO`` server: among its models, the TensorFlow ``deit_with_teacher`` and
    ``vit_classifier`` fixtures as ``tf-<kind>`` and a hand-saved distilled DeiT as ``transformers5-distilled``."""
    return model_zoo(servers.workdir)


@pytest.fixture(scope="module")
def writers_server(writers_store: Path, servers: SharedServers) -> ServerProcess:
    """float32 on the CPU, as the in-process references; shared (``ZOO``), so requests carry its key."""
    return zoo_server(servers)


@pytest.mark.parametrize("name", ZOO_WRITERS)
def test_server_classifies_with_each_writers_checkpoint(
    name: str, writers_store: Path, writers_server: ServerProcess
) -> None:
    image = noise_image_bytes(31)
    response = httpx.post(
        f"{writers_server.url}/classify", params={"model": name, "top_k": 5},
        files=[("file", ("noise.png", image, "image/png"))], headers=ZOO_AUTH, timeout=60,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    predictions = response.json()["results"][0]["predictions"]
    checkpoint = load_checkpoint(writers_store / name)
    pixels = Preprocessor(checkpoint.preprocess)(decode_image(image, max_pixels=10**7)).unsqueeze(0)
    with torch.inference_mode():
        scores = checkpoint.model(pixels).softmax(dim=-1)[0]
    expected = scores.topk(5)
    assert [p["index"] for p in predictions] == expected.indices.tolist()
    assert [p["label"] for p in predictions] == [checkpoint.labels[i] for i in expected.indices.tolist()]
    assert max(abs(p["score"] - s) for p, s in zip(predictions, expected.values.tolist(), strict=True)) < 1e-5
    info = httpx.get(f"{writers_server.url}/v1/models/{name}", headers=ZOO_AUTH, timeout=10).json()
    assert info["architecture"] == checkpoint.config.architecture.value
