"""The shared server profiles of the test suite: settings that several test files share one real server process
under (``SharedServers.get`` in ``tests.serving`` starts each once), the stores they serve, and the helpers of the
tests that use them."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx

from tests.serving import ServerProcess, SharedServers, free_port, write_tiny_model

# --- Profiles of the edge, protocol, checkpoint and runtime tests -------------------------------------------------
# Each is one server for several test files; a test that needs a profile's key sends it, and counters it reads on
# these servers are read as deltas.

# Two API keys (sent either way) with the probes and /metrics left open, the access log on (the defaults), a
# 1-megapixel limit far below every decompression bomb sent to it, float32 on the CPU (what deit_model_info names),
# and a ``gs`` first on PATH that only records that it ran (Pillow's EPS reader would run it): shared by the API-key
# and traceability tests, the decoding tests on a real server, the Prometheus scrape, and the runtime tests as their
# torch reference. ``keyed_server`` starts it.
KEYED_KEYS = ("k1-secret", "k2-secret")
KEYED = {
    "DEIT_DEVICE": "cpu",
    "DEIT_DTYPE": "float32",
    "DEIT_API_KEYS": ",".join(KEYED_KEYS),
    "DEIT_MAX_IMAGE_PIXELS": str(1_000_000),
}
KEYED_AUTH = {"Authorization": f"Bearer {KEYED_KEYS[0]}"}


def ghostscript_trap(directory: Path) -> Path:
    """A ``gs`` in ``directory/bin`` that only touches ``directory/gs-ran`` and fails; returns that marker's path."""
    marker = directory / "gs-ran"
    fake = directory / "bin" / "gs"
    if not fake.exists():
        fake.parent.mkdir(parents=True)
        fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
        fake.chmod(0o755)
    return marker


def keyed_server(servers: SharedServers, tiny_store: Path) -> ServerProcess:
    """The ``KEYED`` server on the suite's ``tiny_store``; its ghostscript trap lies in the shared servers' folder."""
    trap = ghostscript_trap(servers.workdir / "ghostscript").parent / "bin"
    return servers.get(tiny_store, {**KEYED, "PATH": f"{trap}{os.pathsep}{os.environ['PATH']}"})


# Many models behind one API key: ``tiny`` the default (what a request naming no model gets), at most 3 files a
# request (a limit the Hugging Face tests reach), float32 on the CPU (the checkpoint-writer tests compare with CPU
# references at 1e-5): shared by the checkpoint-writer tests (TensorFlow and hand-saved transformers checkpoints), the
# embedding tests (a model of every kind) and the Hugging Face API tests (``tiny`` and ``other``), each file's models
# under their own names. ``zoo_server`` starts it on ``model_zoo``.
ZOO_KEY = "zoo-test-key"
ZOO_AUTH = {"Authorization": f"Bearer {ZOO_KEY}"}
ZOO = {
    "DEIT_DEVICE": "cpu",
    "DEIT_DTYPE": "float32",
    "DEIT_API_KEYS": ZOO_KEY,
    "DEIT_DEFAULT_MODEL": "tiny",
    "DEIT_MAX_FILES": "3",
}
ZOO_WRITERS = ("tf-deit_with_teacher", "tf-vit_classifier", "transformers5-distilled")
ZOO_EMBEDDERS = {"distilled": 20, "vit": 21, "bare": 22, "bare_no_pooler": 23, "mim": 24}  # model kind: its seed
ZOO_EMBEDDER_PREPROCESS = {"size": 34, "crop_size": 30, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def hand_saved(kind: str, directory: Path, suffix: str, seed: int = 3) -> tuple[Any, Path]:
    """``config.json`` from ``save_pretrained`` beside ``model.state_dict()`` written as the user would (as
    transformers ≥ 5 names it in memory); the model and the weights file."""
    import torch
    from safetensors.torch import save_file

    from tests.factories import hf_model

    model = hf_model(kind, seed=seed)  # type: ignore[arg-type]
    model.save_pretrained(directory)
    (directory / "model.safetensors").unlink()
    state = model.state_dict()
    name = {".bin": "pytorch_model.bin", ".pth": "model.pth", ".safetensors": "model.safetensors"}[suffix]
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / name))
    else:
        torch.save(state, directory / name)
    return model, directory / name


def embedding_reference(kind: str, seed: int) -> Any:
    """transformers' model of ``kind`` (an ``HFKind``, or ``bare_no_pooler``) with random weights, in eval mode."""
    from transformers import DeiTConfig, DeiTModel

    from tests.factories import TINY, hf_model, randomize_

    if kind == "bare_no_pooler":
        model = DeiTModel(DeiTConfig(**TINY, attn_implementation="eager"), add_pooling_layer=False)
        randomize_(model, seed)
        return model.eval()
    return hf_model(kind, seed=seed)  # type: ignore[arg-type]


def model_zoo(workdir: Path) -> Path:
    """The ``ZOO`` store in ``workdir``, written once: the writers' checkpoints, an embedding model of every kind
    (``embedding_reference`` with its seed in ``ZOO_EMBEDDERS``), and ``tiny`` (seed 0) and ``other`` (seed 5)."""
    import shutil

    from tests.factories import save_hf

    store = workdir / "model-zoo"
    if store.is_dir():
        return store
    staging = workdir / "model-zoo.partial"
    tf_fixtures = Path(__file__).parent / "fixtures" / "tf"
    for kind in ("deit_with_teacher", "vit_classifier"):
        shutil.copytree(tf_fixtures / kind, staging / f"tf-{kind}", ignore=shutil.ignore_patterns("pytorch"))
    hand_saved("distilled", staging / "transformers5-distilled", ".pth", seed=4)
    for kind, seed in ZOO_EMBEDDERS.items():
        directory = save_hf(embedding_reference(kind, seed), staging / kind)
        (directory / "preprocessor_config.json").write_text(json.dumps(ZOO_EMBEDDER_PREPROCESS))
    write_tiny_model(staging / "tiny", seed=0)
    write_tiny_model(staging / "other", seed=5)
    staging.rename(store)
    return store


def zoo_server(servers: SharedServers) -> ServerProcess:
    """The ``ZOO`` server on ``model_zoo`` in the shared servers' folder."""
    return servers.get(model_zoo(servers.workdir), ZOO)


# The demo model behind one API key, float32 on the CPU: shared by the page tests (the page asks for the key) and the
# quantization tests' float32 reference (an int8 server must answer its samples as it does).
DEMO_KEY = "page-test-key"
DEMO_KEYED = {"DEIT_DEVICE": "cpu", "DEIT_DTYPE": "float32", "DEIT_API_KEYS": DEMO_KEY}


# --- the engine's tests (slow model, overload, drain, model repository): shared settings and helpers -------------


def assert_clean_log(server: ServerProcess, since: int = 0) -> None:
    """No error-level line, traceback or unobserved asyncio future in the server's log from character ``since`` on
    (``len(server.log())`` when a test starts, on a server that other tests use too)."""
    from contextlib import suppress

    httpx.get(f"{server.url}/healthz")  # a round trip: what the last request logged is written
    text = server.log()[since:]
    for marker in ("never retrieved", "was never awaited", "Traceback", "Exception in ASGI application"):
        assert marker not in text, text[-3000:]
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            with suppress(ValueError):
                records.append(json.loads(line))
    # A load refused for its files is the operator's error line, expected where a test asks for one.
    errors = [r for r in records if r.get("level") in ("error", "critical") and r.get("message") != "model load failed"]
    assert not errors, errors


def grpc_address(server: ServerProcess) -> str:
    """Where a server started with ``DEIT_GRPC_PORT`` in its settings answers gRPC."""
    return f"127.0.0.1:{server.env['DEIT_GRPC_PORT']}"


def grpc_bytes_input(images: Sequence[bytes]) -> Any:
    """The ``image`` input of an infer call by tritonclient.grpc: ``images`` as a ``[N, 1]`` BYTES tensor."""
    import numpy as np
    import tritonclient.grpc as triton

    tensor = triton.InferInput("image", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1))
    return tensor


def start_grpc_call(client: Any, model: str, images: Sequence[bytes], **options: Any) -> Future[Any]:
    """An infer call of tritonclient.grpc's ``client`` in flight; its future holds the result or the error, and its
    ``call`` attribute the call (to cancel it)."""
    done: Future[Any] = Future()

    def callback(result: Any, error: Any) -> None:
        done.set_exception(error) if error is not None else done.set_result(result)

    done.call = client.async_infer(model, [grpc_bytes_input(images)], callback, **options)  # type: ignore[attr-defined]
    return done


# The slow model with room for large requests, shared by every test that needs it busy for a while (a large request
# holding it) and does not stop it: test_hardening_failures (clients that leave), test_protocol_metrics (three front
# doors in one forward pass), test_protocol_v2 (a full queue), test_grpc (deadline, cancellation, full queue),
# test_hardening_overload (a full queue, an invalid X-Request-Timeout) and test_hardening_lifecycle (body deadlines,
# the upload budget and decoding, which need no particular model). Start it with ``slow_shared()``: that adds the
# gRPC port.
SLOW_SHARED = {
    # Float32 on one thread, one forward pass at a time: tens of ms per image on any CPU (bf16 is fast on some).
    "DEIT_DEVICE": "cpu",
    "DEIT_DTYPE": "float32",
    "DEIT_TORCH_THREADS": "1",
    "DEIT_FORWARD_WORKERS": "1",
    "DEIT_MAX_BATCH_SIZE": "16",  # test_protocol_metrics counts passes of this size
    "DEIT_MAX_QUEUE_SIZE": "128",  # one request of the most files fills the queue
    "DEIT_MAX_FILES": "128",
    # test_hardening_lifecycle's bounds: uploads of up to 3 MiB, 8 MiB of them in flight at once, two decoding threads.
    "DEIT_MAX_UPLOAD_BYTES": str(3 * 2**20),
    "DEIT_MAX_INFLIGHT_UPLOAD_BYTES": str(8 * 2**20),
    "DEIT_PREPROCESS_THREADS": "2",
}


@functools.cache
def _slow_grpc_port() -> int:
    return free_port()


def slow_shared() -> dict[str, str]:
    """``SLOW_SHARED`` with gRPC on (test_grpc's calls), on a port chosen at the first call, just before the server
    starts: every later call gives the same settings, and so the same server."""
    return {**SLOW_SHARED, "DEIT_GRPC_PORT": str(_slow_grpc_port())}


# The slow model at four times what it can take, shared by the overload tests (test_hardening_overload's sustained
# overload, test_load): a queue of 8 images in batches of 4 that 32 closed-loop clients keep full, and a default
# deadline long enough that an accepted request waiting behind a full queue never reaches it.
OVERLOAD = {
    "DEIT_MAX_QUEUE_SIZE": "8",
    "DEIT_MAX_BATCH_SIZE": "4",
    "DEIT_TORCH_THREADS": "1",
    "DEIT_REQUEST_TIMEOUT_S": "5",
}
