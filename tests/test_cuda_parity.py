"""On a CUDA device: our fused model, as the service prepares it, against transformers in float32 and float16; the
forward slots' streams; nvJPEG decoding with device preprocessing against the CPU path."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data as skdata

from service.engine.runner import checkpoint_forward, stack_on_device
from service.model.cuda_streams import on_thread_stream
from service.model.decoding import load_rgb, open_image
from service.model.device_decoding import DeviceDecoding, nvjpeg_decoder
from service.model.prepare import load_for_serving
from service.model.preprocessing import PreprocessConfig, Preprocessor
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
    ours = load_for_serving(path, device="cuda", dtype=dtype, cuda_graphs=cuda_graphs).model
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


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_two_forward_slots_on_their_own_streams_give_the_serial_answers(cuda_graphs: bool, tmp_path: Path) -> None:
    """Each forward thread copies and runs on its own stream (graphs: replays ordered by an event); batches run
    from two threads at once must give what one thread gives."""
    path = save_hf(hf_model("distilled", seed=5), tmp_path / "store" / "tiny", "safetensors")
    forward = checkpoint_forward(load_for_serving(path, device="cuda", dtype="float16", cuda_graphs=cuda_graphs))
    size = TINY["image_size"]
    batches = [list(torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))) for n in range(1, 25)]
    serial = [forward(b) for b in batches]
    with ThreadPoolExecutor(max_workers=2) as pool:
        parallel = list(pool.map(forward, batches))
    for one, two in zip(serial, parallel, strict=True):
        assert set(one) == set(two)
        for name in one:
            assert one[name].device.type == "cpu"
            # Graphs replay the same kernels; eager cuBLAS may pick other algorithms on another stream's workspace.
            torch.testing.assert_close(two[name], one[name], atol=0 if cuda_graphs else 2e-3, rtol=0)


def test_batches_of_images_already_on_the_device_and_on_the_cpu_stack_alike() -> None:
    device = torch.device("cuda")
    images = [torch.randn(3, 8, 8) for _ in range(4)]
    mixed = [images[0].to(device), images[1], images[2].to(device), images[3]]
    with on_thread_stream(device) as stream:
        assert stream is not None
        for pixels in (images, mixed):
            batch = stack_on_device(pixels, device, stream)
            stream.synchronize()
            assert torch.equal(batch.cpu(), torch.stack(images))


def test_nvjpeg_decoding_and_device_preprocessing_are_close_to_the_cpu_path() -> None:
    pytest.importorskip("torchvision")
    device = torch.device("cuda")
    preprocessor = Preprocessor(PreprocessConfig())
    decoding = DeviceDecoding(preprocessor, device, nvjpeg_decoder(device))
    for photo in (skdata.astronaut(), skdata.coffee(), skdata.chelsea()):  # type: ignore[no-untyped-call]
        buffer = io.BytesIO()
        Image.fromarray(photo).resize((640, 480)).save(buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
        got = decoding(open_image(data, 40_000_000)[0], data)
        assert got is not None
        assert got.device.type == "cuda"
        expected = preprocessor(load_rgb(*open_image(data, 40_000_000)))
        diff = (got.cpu() - expected).abs() / preprocessor.scales.view(3, 1, 1)  # in 8-bit units
        assert diff.mean().item() < 2.0, diff.mean().item()
        assert (diff > 8).float().mean().item() < 0.01
