"""The end-to-end benchmark compares like with like: every server it drives answers the same top-k for the same
upload as transformers itself, and its load generator measures what it claims. (Beside the benchmarks, which it
checks; collected with the test suite.)"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.e2e import server_spec
from benchmarks.loadgen import multipart, run_closed_loop, running
from harness.inputs import write_tiny_model

pytest.importorskip("litserve")


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with one random-weight distilled DeiT named ``tiny``."""
    store = tmp_path_factory.mktemp("store")
    write_tiny_model(store / "tiny")
    return store


def _photo(seed: int) -> bytes:
    """A JPEG with structure (a gradient plus noise), so the classes' scores differ."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:48, 0:64]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1) + rng.integers(0, 60, (48, 64, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _reference(model_dir: Path, photos: list[bytes]) -> list[list[tuple[str, float]]]:
    from transformers import DeiTForImageClassificationWithTeacher, DeiTImageProcessorPil

    model = DeiTForImageClassificationWithTeacher.from_pretrained(model_dir).eval()
    processor = DeiTImageProcessorPil.from_pretrained(model_dir)
    out = []
    for data in photos:
        pixels = processor(Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            probs = torch.softmax(model(pixel_values=pixels).logits[0], -1)
        scores, indices = probs.topk(3)
        out.append([(model.config.id2label[i], s) for s, i in zip(scores.tolist(), indices.tolist(), strict=True)])
    return out


@pytest.mark.parametrize("server", ["ours", "fastapi", "litserve"])
def test_servers_answer_as_transformers_does(server: str, tiny_store: Path, tmp_path: Path) -> None:
    model_dir = tiny_store / "tiny"
    photos = [_photo(seed) for seed in range(4)]
    expected = _reference(model_dir, photos)
    spec = server_spec(server, model_dir, "float32", {})
    with running(spec, tmp_path / f"{server}.log", ready_timeout_s=120) as running_server:
        for data, want in zip(photos, expected, strict=True):
            body = multipart(data, "photo.jpg")
            response = httpx.post(
                running_server.url,
                content=body.content,
                headers={"content-type": body.content_type},
                params={"top_k": 3},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            # The LitServe peer always answers its start-up top_k (5); the others honour the query parameter.
            predictions = response.json()["results"][0]["predictions"][:3]
            assert [p["label"] for p in predictions] == [label for label, _ in want]
            assert [p["score"] for p in predictions] == pytest.approx([score for _, score in want], abs=1e-5)


def test_closed_loop_counts_answers_and_splits_cpu(tiny_store: Path, tmp_path: Path) -> None:
    spec = server_spec("ours", tiny_store / "tiny", "float32", {"max_batch_size": "8"})
    bodies = [multipart(_photo(seed), f"{seed}.jpg") for seed in range(3)]
    with running(spec, tmp_path / "ours.log") as server:
        result = run_closed_loop(
            server.url, bodies, concurrency=4, warmup_s=0.3, duration_s=1.5, server_pgid=server.pgid
        )
    assert not result.errors
    assert len(result.latencies_s) >= 4
    assert all(0 < latency < 10 for latency in result.latencies_s)
    # Little's law and the answers counted in the window agree within the noise of a short window.
    assert result.img_s == pytest.approx(result.counted_img_s, rel=0.5)
    assert result.p50_ms <= result.p99_ms
    assert result.cpu is not None
    assert result.cpu.server > 0
    assert result.cpu.server + result.cpu.client + result.cpu.other <= 1.05
