"""On a CUDA device: our fused model, as the service prepares it, against transformers in float32 and float16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.model.prepare import load_for_serving
from service.settings import Settings
from tests.factories import TINY, hf_model, save_hf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize(("dtype", "atol"), [("float32", 2e-3), ("float16", 2e-2)])
def test_served_model_on_cuda_matches_transformers(dtype: str, atol: float, cuda_graphs: bool, tmp_path: Path) -> None:
    reference = hf_model("distilled", seed=23, attn_implementation="sdpa")
    path = save_hf(reference, tmp_path / "store" / "tiny", "safetensors")
    (path / "preprocessor_config.json").write_text(
        f'{{"size": {TINY["image_size"]}, "crop_size": {TINY["image_size"]}}}'
    )
    values = {"model_store": path.parent, "device": "cuda", "dtype": dtype, "cuda_graphs": cuda_graphs}
    ours = load_for_serving(path, Settings.model_validate(values)).model
    torch_dtype = getattr(torch, dtype)
    reference = reference.to("cuda", torch_dtype).eval()
    size = TINY["image_size"]
    for batch in (1, 5, 32):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to("cuda", torch_dtype)
        with torch.inference_mode():
            expected = reference(pixel_values=x).logits.float()
            got = ours(x).float()
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
