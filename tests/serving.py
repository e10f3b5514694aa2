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
