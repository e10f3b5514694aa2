"""Freed activations stay in the process: the next batch reuses them instead of faulting in fresh pages."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.serving import run_server

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tunes glibc's malloc")

# Forward passes of a small model on a worker thread, as the service runs them; prints page faults per pass.
FAULTS_PER_FORWARD = textwrap.dedent(
    """
    import resource, sys, threading, torch
    from service.allocator import keep_freed_memory
    from service.config import DeiTConfig
    from service.model import DeiT

    torch.set_num_threads(1)
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    config = DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                        id2label={0: "a", 1: "b"})
    model = DeiT(config).eval()
    pixels = torch.randn(8, 3, 224, 224)
    faults = []

    def run():
        with torch.inference_mode():
            for _ in range(3):
                model(pixels)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                model(pixels)
            faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    print(faults[0])
    """
)


def _faults_per_forward(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_FORWARD, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return float(done.stdout.strip())


@glibc_only
def test_kept_memory_removes_page_faults_of_repeated_forward_passes() -> None:
    default = _faults_per_forward("default")
    kept = _faults_per_forward("keep")
    # glibc's defaults return the activations (over 128 KiB each) to the kernel after every pass.
    assert default > 100
    assert kept * 20 <= default, (default, kept)


@glibc_only
def test_server_tunes_malloc_unless_told_not_to(tiny_store: Path, tmp_path: Path) -> None:
    message = "malloc keeps freed blocks up to 32 MiB for reuse"
    with run_server(tiny_store, tmp_path) as server:
        assert message in server.log()
    with run_server(tiny_store, tmp_path, env={"DEIT_KEEP_FREED_MEMORY": "false"}) as server:
        log = server.log()
        assert "ready" in log
        assert message not in log
