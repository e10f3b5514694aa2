"""Support for service tests: tiny model stores, images, and a real ``deit-serve`` process on a free port (started
through ``harness.launcher``, the one launcher of tests and benchmarks)."""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from PIL import Image

from harness.inputs import write_tiny_model as write_tiny_model
from harness.launcher import ServerProcess as ServerProcess
from harness.launcher import free_port as free_port
from harness.launcher import launch, running, service_argv, service_env, stop
from harness.launcher import wait_ready as wait_ready
from harness.load import rss_bytes as rss_bytes
from service.app import create_app
from service.settings import Settings

stop_process = stop  # the name tests use

# Upload bounds small enough to reach in a test, on the tiny model in float32: the settings of the one server the
# upload-hardening, Open Inference Protocol and protocol-fuzzing tests share.
SMALL_UPLOADS = {
    "DEIT_DEVICE": "cpu",
    "DEIT_DTYPE": "float32",
    "DEIT_MAX_FILES": "4",
    "DEIT_MAX_UPLOAD_BYTES": str(256 * 1024),
    "DEIT_MAX_IMAGE_PIXELS": str(1_000_000),
    "DEIT_ACCESS_LOG": "false",
}

# HTTP-edge bounds small enough to reach in a test, one API key, and /metrics behind it: the settings of the one
# server the HTTP-hardening tests and the metrics-protection test share.
EDGE_KEY = "s3cret-key"
EDGE_LIMITS = {
    "DEIT_MAX_HEADER_BYTES": "8192",
    "DEIT_MAX_HEADERS": "20",
    "DEIT_HEADER_TIMEOUT_S": "3.0",
    "DEIT_KEEP_ALIVE_TIMEOUT_S": "1",
    "DEIT_MAX_CONNECTIONS": "6",
    "DEIT_BACKLOG": "77",
    "DEIT_API_KEYS": EDGE_KEY,
    "DEIT_PROTECT_METRICS": "true",
}
REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "service" / "data" / "model_store" / "deit-tiny-digits"


def image_bytes(
    size: tuple[int, int] = (48, 40), color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG"
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def wait_until(
    condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition", every: float = 0.01
) -> None:
    """Poll ``condition`` every ``every`` seconds until it holds; TimeoutError naming ``what`` after ``timeout``
    seconds. A condition that asks the server under test (a scrape) polls less often, so as not to load it."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(every)


@contextmanager
def run_server(
    store: Path, tmp_path: Path, env: Mapping[str, str] | None = None, args: list[str] | None = None,
    wait: bool = True, ready_timeout: float = 120.0,
) -> Iterator[ServerProcess]:  # fmt: skip
    """Start ``python -m service`` on a free port with ``DEIT_*`` settings; always stopped afterwards. A start
    that exports its models to another runtime (``DEIT_RUNTIME``) may need a longer ``ready_timeout``."""
    port = free_port()
    with running(
        service_argv(*(args or [])), port=port, log_path=tmp_path / f"server-{port}.log",
        env=service_env(port, store, env), ready_path="/readyz" if wait else None, ready_timeout=ready_timeout,
    ) as server:  # fmt: skip
        yield server


class SharedServers:
    """Servers shared by every test that asks for the same store, settings and arguments (the suite's
    ``servers`` fixture): a test that neither mutates its store nor stops its server takes one from here instead of
    starting its own. At most ``keep`` stay running (enough for every profile of the suite, so that none is started
    twice in one run; an idle tiny-model server holds a few hundred MB); the least recently asked for is stopped
    first."""

    def __init__(self, workdir: Path, keep: int = 10) -> None:
        self.workdir = workdir
        self.keep = keep
        self._running: dict[tuple[str, tuple[tuple[str, str], ...], tuple[str, ...]], ExitStack] = {}
        self._servers: dict[tuple[str, tuple[tuple[str, str], ...], tuple[str, ...]], ServerProcess] = {}

    def get(
        self, store: Path, env: Mapping[str, str] | None = None, args: Sequence[str] = (), ready_timeout: float = 120.0
    ) -> ServerProcess:
        key = (str(store), tuple(sorted((env or {}).items())), tuple(args))
        if key in self._servers:
            self._servers[key] = self._servers.pop(key)  # most recently asked for last
            self._running[key] = self._running.pop(key)
            return self._servers[key]
        while len(self._running) >= self.keep:
            oldest = next(iter(self._running))
            self._servers.pop(oldest)
            self._running.pop(oldest).close()
        stack = ExitStack()
        self._servers[key] = stack.enter_context(
            run_server(store, self.workdir, env, list(args), ready_timeout=ready_timeout)
        )
        self._running[key] = stack
        return self._servers[key]

    def close(self) -> None:
        while self._running:
            self._servers.popitem()
            self._running.popitem()[1].close()


def spawn_server(store: Path, tmp_path: Path, port: int, env: Mapping[str, str] | None = None) -> ServerProcess:
    """Start ``python -m service`` on a given ``port`` (a replica its balancer expects there) and return at once;
    the caller stops it (``stop_process``). Each start on a port gets its own log file."""
    starts = len(list(tmp_path.glob(f"server-{port}-*.log")))
    log_path = tmp_path / f"server-{port}-{starts}.log"
    return launch(service_argv(), port=port, log_path=log_path, env=service_env(port, store, env))


def noise_image_bytes(seed: int, size: tuple[int, int] = (40, 36), image_format: str = "PNG") -> bytes:
    """An image of seeded random pixels (PNG, or JPEG at quality 90): distinct seeds give distinct predictions,
    unlike flat colours."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    return buf.getvalue()


@dataclass(frozen=True)
class Scrape:
    """One parsed ``/metrics`` page (Prometheus text format, read by prometheus_client's own parser)."""

    families: dict[str, list[tuple[str, dict[str, str], float]]]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        from prometheus_client.parser import text_string_to_metric_families

        families: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            families[family.name] = [(s.name, dict(s.labels), float(s.value)) for s in family.samples]
        return cls(families)

    def value(self, sample: str, **labels: str) -> float:
        """Sum of the samples named ``sample`` whose labels include ``labels``; 0 when none match."""
        return sum(
            value
            for samples in self.families.values()
            for name, sample_labels, value in samples
            if name == sample and all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def has_sample(self, sample: str, **labels: str) -> bool:
        return any(
            name == sample and all(sample_labels.get(k) == v for k, v in labels.items())
            for samples in self.families.values()
            for name, sample_labels, _ in samples
        )


def scrape(server: ServerProcess | str) -> Scrape:
    """The ``/metrics`` page of a server (or of a base URL), parsed."""
    url = server if isinstance(server, str) else server.url
    return Scrape.parse(httpx.get(f"{url}/metrics", timeout=10).text)


@contextmanager
def run_default_server(tmp_path: Path, wait: bool = True) -> Iterator[ServerProcess]:
    """``deit-serve`` as a user starts it: the console script, no model store setting, from an unrelated directory.

    Only the listening address is set (``DEIT_HOST``/``DEIT_PORT``), so the model store is the built-in default.
    """
    executable = Path(sys.executable).parent / "deit-serve"
    if not executable.is_file():
        raise FileNotFoundError(f"{executable} is missing: install the project (scripts/setup) to get the command")
    port = free_port()
    with running(
        [str(executable)], port=port, log_path=tmp_path / f"server-{port}.log", env=service_env(port), cwd=tmp_path,
        ready_path="/readyz" if wait else None,
    ) as server:  # fmt: skip
        yield server


# A DeiT with 578 tokens: tens of milliseconds per image on one CPU thread, so that requests queue behind a batch.
SLOW_MODEL = {"image_size": 96, "patch_size": 4, "hidden_size": 192, "num_hidden_layers": 4}


def write_slow_model(directory: Path, seed: int = 0) -> Path:
    """A random-weight distilled DeiT large enough that deadlines, disconnects and drain happen while it is busy."""
    import torch
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(seed)
    labels = {i: f"class_{i}" for i in range(10)}
    config = DeiTConfig(
        num_attention_heads=4,
        intermediate_size=2 * SLOW_MODEL["hidden_size"],
        num_labels=10,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        **SLOW_MODEL,
    )
    DeiTForImageClassificationWithTeacher(config).eval().save_pretrained(directory)
    size = SLOW_MODEL["image_size"]
    preprocess = {"size": size, "crop_size": size, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocess))
    return directory


def overflowing_head(model: Path) -> None:
    """Finite weights whose logits overflow float32 to ±infinity, so that every softmax is NaN (a tiny model's
    directory, changed in place)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = model / "model.safetensors"
    state = load_file(str(path))
    for name in ("cls_classifier.weight", "distillation_classifier.weight"):
        state[name] = torch.full_like(state[name], 3e38)
    save_file(state, str(path), metadata={"format": "pt"})


def write_big_model(directory: Path) -> Path:
    """A random-weight DeiT with ~10 M parameters (~42 MB in float32) on a 32-pixel input: cheap to run, big
    enough that its memory shows in the process's RSS."""
    import torch
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(0)
    labels = {i: f"class_{i}" for i in range(10)}
    config = DeiTConfig(image_size=32, patch_size=8, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                        intermediate_size=1536, num_labels=10, id2label=labels,
                        label2id={v: k for k, v in labels.items()})  # fmt: skip
    DeiTForImageClassificationWithTeacher(config).eval().save_pretrained(directory)
    preprocess = {"size": 36, "crop_size": 32, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocess))
    return directory


def settled_rss(pid: int) -> int:
    """RSS once it stops moving (the smallest of a few readings a moment apart)."""
    readings = []
    for _ in range(5):
        time.sleep(0.2)
        readings.append(rss_bytes(pid))
    return min(readings)


def multipart(images: list[bytes], prefix: str = "img") -> list[tuple[str, tuple[str, bytes, str]]]:
    """``files=`` for httpx: one ``file`` field per image."""
    return [("file", (f"{prefix}{i}.png", data, "image/png")) for i, data in enumerate(images)]


@dataclass
class InProcessServer:
    """A uvicorn server running ``create_app`` in a thread of the test process, so tests can reach its internals."""

    url: str
    app: FastAPI
    server: uvicorn.Server


@contextmanager
def serve_in_process(settings: Settings) -> Iterator[InProcessServer]:
    """Serve ``create_app(settings)`` on ``settings.port`` from a background thread; stopped (drained) afterwards.
    The gRPC port is off unless ``settings`` sets one, as for every server the harness starts."""
    if "grpc_port" not in settings.model_fields_set:
        settings = settings.model_copy(update={"grpc_port": 0})
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    try:
        wait_ready(url)
        yield InProcessServer(url, app, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        if thread.is_alive():
            raise RuntimeError("in-process server did not stop within 30 s")


def read_answer(sock: socket.socket) -> tuple[int, Any]:
    """Status and JSON body of the HTTP/1.1 answer on ``sock``, read up to its Content-Length (bounded by 10 s)."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < content_length(data):
        try:
            received = sock.recv(65536)
        except ConnectionResetError:  # the server closed with upload bytes unread; what it sent was read first
            break
        if not received:
            break
        data += received
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def expect_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text


def plain_error(response: httpx.Response, status: int) -> str:
    """The message of an error in the ``{"error": "<message>"}`` shape (Open Inference Protocol, Hugging Face)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    return str(body["error"])


def multipart_body(images: list[bytes], boundary: str | None = None) -> tuple[bytes, str]:
    """A complete multipart body with one ``file`` part per image, and its Content-Type."""
    boundary = boundary or uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(images)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def classify_probabilities(
    url: str, images: Sequence[bytes], num_labels: int, headers: Mapping[str, str] | None = None
) -> Any:
    """Every class probability of ``images`` (JPEGs) as ``POST /classify`` answers them, ``[N, labels]`` float32."""
    import numpy as np

    files = [("file", (f"img{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    r = httpx.post(f"{url}/classify", params={"top_k": num_labels}, files=files, headers=headers, timeout=30)
    r.raise_for_status()
    probs = np.zeros((len(images), num_labels), dtype=np.float32)
    for row, result in enumerate(r.json()["results"]):
        for p in result["predictions"]:
            probs[row, p["index"]] = p["score"]
    return probs


def preprocessed_pixels(model_dir: Path, images: Sequence[bytes]) -> Any:
    """``images`` preprocessed by the service's own Preprocessor for the model at ``model_dir``, ``[N, 3, H, W]``
    float32."""
    import numpy as np

    from service.model.checkpoints import load_checkpoint
    from service.model.decoding import decode_image
    from service.model.preprocessing import Preprocessor

    preprocess = Preprocessor(load_checkpoint(model_dir, device="cpu", dtype="float32").preprocess)
    return np.stack([preprocess(decode_image(data, 10**8)).numpy() for data in images]).astype(np.float32)


class EndlessBody:
    """A chunked request body of ``chunks`` chunks of ``filler`` (128 MiB by default) that counts the bytes the
    server pulled from it: iterate it as httpx's ``content``."""

    def __init__(self, filler: bytes = bytes(65536), chunks: int = 2048) -> None:
        self.filler, self.chunks, self.pulled = filler, chunks, 0

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += len(self.filler)
            yield self.filler


# --- start-up: a start that must fail, checked in the test process ---------------------------------------------------
# The tests of start-ups that end in an error (test_hub_models, test_service_process, test_hardening_store,
# test_device_decoding) check each error here, through the very start-up ``deit-serve`` runs (``create_app`` and its
# lifespan, the models loading in the background until ``on_fatal``); each way a process exits keeps one test on a
# real process.


@dataclass
class FailedStart:
    """What a start-up that failed left: its one error line, as the service's JSON log writes it and parsed."""

    line: str
    record: dict[str, Any]
    loaded: list[str]  # the models loaded when it failed (in name order, those before the failing one)


def failed_start(settings: Settings, timeout: float = 120.0) -> FailedStart:
    """Start ``create_app(settings)`` as ``deit-serve`` does (gRPC off unless ``settings`` sets a port) and wait
    for its start-up to fail: asserts that the load ended by calling ``on_fatal`` once (the CLI then exits 1), that
    the service never became ready, and that exactly one error line was logged, one line of JSON."""
    import asyncio
    import logging

    from service.engine.lifecycle import Phase
    from service.logs import JsonFormatter

    if "grpc_port" not in settings.model_fields_set:
        settings = settings.model_copy(update={"grpc_port": 0})
    fatal: list[bool] = []
    app = create_app(settings, on_fatal=lambda: fatal.append(True))
    errors: list[logging.LogRecord] = []

    class Errors(logging.Handler):  # every error record, of any logger, while the start-up runs
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record)

    handler = Errors(logging.ERROR)

    phases: list[Phase] = []
    loaded: list[str] = []

    async def start() -> None:
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app.state.loading, timeout)
            phases.append(app.state.lifecycle.phase)
            loaded.extend(sorted(app.state.deit.repository.store.models))

    root = logging.getLogger()
    root.addHandler(handler)
    try:
        asyncio.run(start())
    finally:
        root.removeHandler(handler)
    assert fatal == [True], "the start-up did not fail"
    assert phases == [Phase.FAILED]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    line = JsonFormatter().format(errors[0])
    assert "\n" not in line, line
    return FailedStart(line, json.loads(line), loaded)


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
    import os

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
_slow_grpc_port: list[int] = []


def slow_shared() -> dict[str, str]:
    """``SLOW_SHARED`` with gRPC on (test_grpc's calls), on a port chosen at the first call, just before the server
    starts: every later call gives the same settings, and so the same server."""
    if not _slow_grpc_port:
        _slow_grpc_port.append(free_port())
    return {**SLOW_SHARED, "DEIT_GRPC_PORT": str(_slow_grpc_port[0])}


# The slow model at four times what it can take, shared by the overload tests (test_hardening_overload's sustained
# overload, test_load): a queue of 8 images in batches of 4 that 32 closed-loop clients keep full, and a default
# deadline long enough that an accepted request waiting behind a full queue never reaches it.
OVERLOAD = {
    "DEIT_MAX_QUEUE_SIZE": "8",
    "DEIT_MAX_BATCH_SIZE": "4",
    "DEIT_TORCH_THREADS": "1",
    "DEIT_REQUEST_TIMEOUT_S": "5",
}
