"""CUDA graphs for bucketed batch sizes: the bucketing and padding on any machine, the graphs on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.model.checkpoints import load_checkpoint
from service.model.cuda_graphs import GraphedModel, bucket_for, bucket_sizes, fill_bucket
from service.model.prepare import load_for_serving
from tests.serving import write_tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("max_batch", "expected"),
    [(1, (1,)), (2, (1, 2)), (8, (1, 2, 4, 8)), (24, (1, 2, 4, 8, 16, 24)), (32, (1, 2, 4, 8, 16, 32))],
)
def test_buckets_are_powers_of_two_capped_by_the_largest_batch(max_batch: int, expected: tuple[int, ...]) -> None:
    assert bucket_sizes(max_batch) == expected


def test_every_batch_goes_to_the_smallest_bucket_that_holds_it_with_at_most_twice_the_rows() -> None:
    buckets = bucket_sizes(48)
    for batch in range(1, 49):
        bucket = bucket_for(batch, buckets)
        assert bucket >= batch
        assert all(b < batch for b in buckets if b < bucket)
        assert bucket < 2 * batch or batch == 1
    for batch in (0, 49):
        with pytest.raises(ValueError, match="fits no bucket"):
            bucket_for(batch, buckets)
    with pytest.raises(ValueError, match="at least 1"):
        bucket_sizes(0)


def test_fill_bucket_copies_the_batch_and_zeroes_stale_rows() -> None:
    buffer = torch.full((8, 3, 2, 2), 7.0)
    batch = torch.randn(5, 3, 2, 2)
    assert fill_bucket(buffer, batch) is buffer
    assert torch.equal(buffer[:5], batch)
    assert torch.count_nonzero(buffer[5:]) == 0
    with pytest.raises(ValueError, match="does not fit"):
        fill_bucket(buffer, torch.zeros(9, 3, 2, 2))
    with pytest.raises(ValueError, match="does not fit"):
        fill_bucket(buffer, torch.zeros(2, 3, 4, 4))


def test_padding_a_batch_to_its_bucket_leaves_the_real_rows_results_unchanged(tmp_path: Path) -> None:
    model = load_checkpoint(write_tiny_model(tmp_path / "tiny")).model.fuse_attention_projections()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    buffer = torch.full((bucket_for(5, bucket_sizes(32)), 3, 32, 32), 3.0)
    with torch.inference_mode():
        padded = model(fill_bucket(buffer, x))[:5]
        alone = model(x)
    assert padded.shape == alone.shape
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graphed_model_matches_the_eager_model_for_every_batch_size(dtype: torch.dtype, tmp_path: Path) -> None:
    device = torch.device("cuda")
    model = load_checkpoint(write_tiny_model(tmp_path / "tiny"), device=device, dtype=dtype).model
    model = model.fuse_attention_projections()
    graphed = GraphedModel(model, bucket_sizes(8), (3, 32, 32), dtype, device)
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        for n in (1, 3, 8, 5, 1):  # different buckets, and back: each replay must not see the previous batch
            x = torch.randn(n, 3, 32, 32, device=device, dtype=dtype)
            out = graphed(x)
            assert out.shape == (n, model.config.num_labels)
            torch.testing.assert_close(out.float(), model(x).float(), atol=atol, rtol=0)
        odd = torch.randn(2, 3, 48, 48, device=device, dtype=dtype)  # not the captured shape: runs eagerly
        torch.testing.assert_close(graphed(odd).float(), model(odd).float(), atol=atol, rtol=0)


@cuda
def test_the_service_loads_a_graphed_model_on_cuda(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "store" / "tiny")
    checkpoint = load_for_serving(path, device="cuda", cuda_graphs=True, max_batch_size=4)
    assert isinstance(checkpoint.model, GraphedModel)
    assert checkpoint.model.buckets == (1, 2, 4)
