"""Our DeiT reproduces transformers' outputs for every checkpoint format and head we load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from service.model.architecture import Architecture
from service.model.checkpoints import load_checkpoint
from service.model.deit import DeiT, DistilledDeiT, SelfAttention
from tests.factories import TINY, HFFormat, HFKind, TimmWrapping, hf_model, save_hf, save_timm

ATOL = 1e-4
NATIVE = (TINY["image_size"], TINY["image_size"])
# Native, a larger square grid, and a non-square one: the last two take the bicubic position-embedding path.
RESOLUTIONS = [NATIVE, (40, 40), (24, 36)]
EXPECTED: dict[str, tuple[Architecture, str]] = {
    "distilled": (Architecture.DISTILLED, "deit"),
    "single_head": (Architecture.SINGLE_HEAD, "deit"),
    "vit": (Architecture.SINGLE_HEAD, "vit"),
    "mim": (Architecture.MASKED_IMAGE_MODELING, "deit"),
    "bare": (Architecture.BARE, "deit"),
}


def _inputs(height: int, width: int, batch: int = 3, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed + height * 1000 + width))


def _reference(model: PreTrainedModel, kind: HFKind, x: Tensor, **kwargs: Any) -> Tensor:
    with torch.inference_mode():
        out = model(x, interpolate_pos_encoding=True, **kwargs)
    if kind == "mim":
        return out.reconstruction
    if kind == "bare":
        return out.last_hidden_state
    return out.logits


def _assert_nontrivial(reference: Tensor) -> None:
    """A comparison against constant or zero outputs would pass for a broken model."""
    assert reference.abs().max() > 0.1
    assert reference.std() > 0.05
    assert not torch.allclose(reference[0], reference[1], atol=1e-2), "batch items should give different outputs"


def _layer_norm_eps(model: nn.Module) -> set[float]:
    return {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}


def _max_diff(ours: Tensor, reference: Tensor) -> float:
    assert ours.shape == reference.shape
    assert ours.dtype == reference.dtype == torch.float32
    return (ours - reference).abs().max().item()


def _resolutions(kind: HFKind, all_sizes: bool = True) -> list[tuple[int, int]]:
    """The file format only changes loading, so other resolutions are checked once per head kind."""
    if not all_sizes:
        return [NATIVE]
    # transformers' masked-image-modeling decoder assumes a square patch grid.
    return [r for r in RESOLUTIONS if kind != "mim" or r[0] == r[1]]


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
@pytest.mark.parametrize("kind", ["distilled", "single_head", "vit", "mim", "bare"])
def test_hf_checkpoint_matches_transformers(kind: HFKind, fmt: HFFormat, tmp_path: Path) -> None:
    reference_model = hf_model(kind, seed=3)
    checkpoint = load_checkpoint(save_hf(reference_model, tmp_path / "ckpt", fmt), dtype="float32")
    ours = checkpoint.model
    assert (checkpoint.config.architecture, checkpoint.config.model_type) == EXPECTED[kind]
    assert _layer_norm_eps(ours) == {reference_model.config.layer_norm_eps} == {1e-12}
    for height, width in _resolutions(kind, all_sizes=fmt == "safetensors"):
        x = _inputs(height, width)
        reference = _reference(reference_model, kind, x)
        _assert_nontrivial(reference)
        with torch.inference_mode():
            diff = _max_diff(ours(x), reference)
        print(f"parity {kind}/{fmt} {height}x{width}: max |ours - transformers| = {diff:.2e}")
        assert diff < ATOL


def test_distilled_logits_average_both_heads(distilled_model: PreTrainedModel, distilled_dir: Path) -> None:
    ours = load_checkpoint(distilled_dir).model
    for height, width in RESOLUTIONS:
        x = _inputs(height, width)
        with torch.inference_mode():
            out = distilled_model(x, interpolate_pos_encoding=True)
            cls_logits, dist_logits = ours.head_logits(x)
            logits = ours(x)
        _assert_nontrivial(out.distillation_logits)
        assert not torch.allclose(out.cls_logits, out.distillation_logits, atol=1e-2)
        torch.testing.assert_close(cls_logits, out.cls_logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(dist_logits, out.distillation_logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(logits, (out.cls_logits + out.distillation_logits) / 2, atol=ATOL, rtol=0)


def test_bare_model_pooler_matches_transformers(tmp_path: Path) -> None:
    reference_model = hf_model("bare", seed=5)
    checkpoint = load_checkpoint(save_hf(reference_model, tmp_path / "bare"))
    assert checkpoint.config.architecture is Architecture.BARE
    assert checkpoint.config.add_pooling_layer
    for height, width in RESOLUTIONS:
        x = _inputs(height, width)
        with torch.inference_mode():
            reference = reference_model(x, interpolate_pos_encoding=True).pooler_output
            diff = _max_diff(checkpoint.model.pooled(x), reference)
        _assert_nontrivial(reference)
        print(f"parity bare/pooler {height}x{width}: max |ours - transformers| = {diff:.2e}")
        assert diff < ATOL


def test_masked_image_modeling_with_mask_matches_transformers(tmp_path: Path) -> None:
    reference_model = hf_model("mim", seed=11)
    ours = load_checkpoint(save_hf(reference_model, tmp_path / "mim")).model
    x = _inputs(*NATIVE)
    num_patches = (TINY["image_size"] // TINY["patch_size"]) ** 2
    mask = torch.rand(x.shape[0], num_patches, generator=torch.Generator().manual_seed(2)) < 0.4
    reference = _reference(reference_model, "mim", x, bool_masked_pos=mask)
    unmasked = _reference(reference_model, "mim", x)
    assert not torch.allclose(reference, unmasked, atol=1e-2), "the mask token should change the reconstruction"
    with torch.inference_mode():
        diff = _max_diff(ours(x, bool_masked_pos=mask), reference)
    print(f"parity mim/masked: max |ours - transformers| = {diff:.2e}")
    assert diff < ATOL


@pytest.mark.parametrize("wrapping", ["plain", "model", "module", "model_module"])
@pytest.mark.parametrize("kind", ["distilled", "vit"])
def test_timm_checkpoint_matches_transformers(kind: HFKind, wrapping: TimmWrapping, tmp_path: Path) -> None:
    # timm trains with LayerNorm eps 1e-6 and our .pth loader uses it, so the reference must too.
    reference_model = hf_model(kind, seed=13, layer_norm_eps=1e-6)
    path = save_timm(reference_model, tmp_path / "timm" / "deit.pth", wrapping)
    checkpoint = load_checkpoint(path, num_heads=TINY["num_attention_heads"])
    assert _layer_norm_eps(checkpoint.model) == {1e-6}
    assert (checkpoint.config.architecture, checkpoint.config.model_type) == EXPECTED[kind]
    for height, width in _resolutions(kind, all_sizes=wrapping == "plain"):
        x = _inputs(height, width)
        reference = _reference(reference_model, kind, x)
        _assert_nontrivial(reference)
        with torch.inference_mode():
            diff = _max_diff(checkpoint.model(x), reference)
        print(f"parity timm-{kind}/{wrapping} {height}x{width}: max |ours - transformers| = {diff:.2e}")
        assert diff < ATOL


def _peaked(model: DeiT, images: Tensor) -> DeiT:
    """Turn the heads into a nearest-centroid classifier: image i is class i by a wide margin."""
    assert isinstance(model, DistilledDeiT)
    with torch.inference_mode():
        seq = model.backbone(images)
    with torch.no_grad():
        for head, token in ((model.cls_classifier, 0), (model.distillation_classifier, 1)):
            features = seq[:, token].clone()
            centre = features.mean(dim=0)
            rows = features - centre
            rows = rows / rows.norm(dim=1, keepdim=True)
            head.weight.copy_(rows * 10.0)
            head.bias.copy_(-(head.weight @ centre))
    return model


def test_bfloat16_keeps_float32_top1(tmp_path: Path) -> None:
    num_images = 8
    directory = save_hf(hf_model("distilled", seed=21, num_labels=num_images), tmp_path / "ckpt")
    images = _inputs(*NATIVE, batch=num_images, seed=9)
    fp32 = _peaked(load_checkpoint(directory, dtype="float32").model, images)
    peaked_dir = tmp_path / "peaked"
    peaked_dir.mkdir()
    (peaked_dir / "config.json").write_bytes((directory / "config.json").read_bytes())
    save_file({k: v.contiguous() for k, v in fp32.state_dict().items()}, str(peaked_dir / "model.safetensors"))

    bf16 = load_checkpoint(peaked_dir, dtype="bfloat16").model
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with torch.inference_mode():
        logits32 = fp32(images)
        logits16 = bf16(images)
    assert logits16.dtype == torch.bfloat16
    top1 = logits32.argmax(dim=1)
    assert top1.tolist() == list(range(num_images)), "the peaked model should put image i in class i"
    top2 = logits32.topk(2).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    print(f"bf16: min top-1 margin {margin:.2f}, max |bf16 - fp32| = {(logits16.float() - logits32).abs().max():.2e}")
    assert margin > 1.0
    assert torch.equal(logits16.float().argmax(dim=1), top1)
    torch.testing.assert_close(logits16.float(), logits32, atol=0.25, rtol=0.05)


def _fused_attention(model: DeiT) -> list[nn.Linear]:
    return [m.qkv for m in model.modules() if isinstance(m, SelfAttention) and m.qkv is not None]


@pytest.mark.parametrize("source", ["distilled", "single_head", "vit", "mim", "bare", "timm"])
def test_fused_qkv_matches_transformers_and_the_unfused_model(source: str, tmp_path: Path) -> None:
    kind: HFKind = "distilled" if source == "timm" else source  # type: ignore[assignment]
    reference_model = hf_model(kind, seed=17, layer_norm_eps=1e-6 if source == "timm" else 1e-12)
    if source == "timm":
        path = save_timm(reference_model, tmp_path / "deit.pth")
    else:
        path = save_hf(reference_model, tmp_path / "ckpt", "safetensors")

    def load() -> DeiT:
        heads = TINY["num_attention_heads"] if source == "timm" else None
        return load_checkpoint(path, num_heads=heads).model

    unfused, fused = load(), load().fuse_attention_projections()
    layers = reference_model.config.num_hidden_layers
    assert len(_fused_attention(fused)) == layers
    assert not any(hasattr(m, "query") for m in fused.modules() if isinstance(m, SelfAttention))
    d = reference_model.config.hidden_size
    assert {tuple(q.weight.shape) for q in _fused_attention(fused)} == {(3 * d, d)}
    for height, width in _resolutions(kind):
        x = _inputs(height, width)
        reference = _reference(reference_model, kind, x)
        _assert_nontrivial(reference)
        with torch.inference_mode():
            diff = _max_diff(fused(x), reference)
            against_unfused = _max_diff(fused(x), unfused(x))
        print(f"parity fused {source} {height}x{width}: max |fused - transformers| = {diff:.2e}")
        assert diff < ATOL
        assert against_unfused < ATOL


SERVED_FORMS = ["fused", "fused, no q/k/v bias", "DeiT III layer scale", "unfused", "int8"]


@pytest.mark.parametrize("form", SERVED_FORMS)
def test_the_serving_forward_in_place_gives_the_functional_forwards_outputs_exactly(form: str, tmp_path: Path) -> None:
    """Under ``inference_mode`` (how the engine serves) the blocks write the GELU and residual adds in place and the
    fused q/k/v and the MLP's hidden layer into one scratch buffer: bit-identical to the plain forward that autograd
    and the exporters see, and skipped where a Linear cannot take it (int8, unfused q/k/v)."""
    if form == "DeiT III layer scale":
        fixture = Path(__file__).parent / "fixtures" / "timm" / "deit3_small_patch16_224"
        with np.load(fixture.with_suffix(".npz")) as data:
            heads, x = int(data["num_heads"]), torch.from_numpy(data["pixel_values"])
        model: DeiT = load_checkpoint(fixture.with_suffix(".pth"), num_heads=heads).model
        assert model.config.layer_scale
    else:
        reference = hf_model("distilled", seed=23, qkv_bias=form != "fused, no q/k/v bias")
        model = load_checkpoint(save_hf(reference, tmp_path / "ckpt", "safetensors")).model
        x = _inputs(*NATIVE)
    if form != "unfused":
        model.fuse_attention_projections()
    if form == "int8":
        from service.model.quantization import quantize_int8

        model = quantize_int8(model)
    layers = model.backbone.encoder.layer
    widths = [block.scratch_width() for block in layers]  # type: ignore[operator]
    assert all((width > 0) == (form not in ("unfused", "int8")) for width in widths)
    with torch.no_grad():
        functional = model(x)
    with torch.inference_mode():
        served = model(x)
        again = model(x)  # the scratch of one forward does not leak into the next
    _assert_nontrivial(functional)
    assert torch.equal(served, functional)
    assert torch.equal(again, functional)
