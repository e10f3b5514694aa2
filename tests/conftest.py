"""Fixtures shared across the test suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel
from transformers.utils import logging as transformers_logging

from service.engine.runtimes.openvino import decline_usage_reports
from tests.factories import TINY, hf_model, save_hf
from tests.serving import SharedServers, write_slow_model, write_tiny_model


def pytest_configure(config: pytest.Config) -> None:
    """Quiet, predictable runs: no progress bars, and one intra-op thread since tiny models gain nothing from more."""
    transformers_logging.disable_progress_bar()
    # As the service does: OpenVINO's tools send no usage reports from a test run (nor write ~/intel), in CI or not.
    decline_usage_reports()
    # OpenMP spin-waiting costs more than the tiny matmuls it splits; on a busy machine it slowed the suite 3×.
    torch.set_num_threads(1)


@pytest.fixture
def pixel_values() -> torch.Tensor:
    """A reproducible batch of 3 images at the tiny models' native resolution."""
    size = TINY["image_size"]
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1234))


@pytest.fixture
def distilled_model() -> PreTrainedModel:
    """transformers' two-head DeiT with the tiny shapes and random weights."""
    return hf_model("distilled", seed=7)


@pytest.fixture
def distilled_dir(distilled_model: PreTrainedModel, tmp_path: Path) -> Path:
    """``distilled_model`` saved by ``save_pretrained`` as a safetensors checkpoint directory."""
    return save_hf(distilled_model, tmp_path / "deit-tiny-distilled")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with one random-weight distilled DeiT named ``tiny`` (10 labels ``class_0``…``class_9``)."""
    store = tmp_path_factory.mktemp("store")
    write_tiny_model(store / "tiny")
    return store


@pytest.fixture(scope="session")
def slow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with one deliberately slow model named ``slow`` (see ``write_slow_model``)."""
    store = tmp_path_factory.mktemp("slow-store")
    write_slow_model(store / "slow")
    return store


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServers]:
    """Server processes shared by every test that asks for the same store and settings (``servers.get``)."""
    shared = SharedServers(tmp_path_factory.mktemp("shared-servers"))
    try:
        yield shared
    finally:
        shared.close()
