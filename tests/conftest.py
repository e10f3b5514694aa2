"""Fixtures shared by the service tests: a tiny model store written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serving import write_tiny_model


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with one random-weight distilled DeiT named ``tiny`` (10 labels ``class_0``…``class_9``)."""
    store = tmp_path_factory.mktemp("store")
    write_tiny_model(store / "tiny")
    return store
