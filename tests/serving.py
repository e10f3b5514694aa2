"""Support for service tests: tiny model stores, images, and a real ``deit-serve`` process on a free port."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from PIL import Image

from benchmarks.loadgen import free_port as free_port
from service.app import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "service" / "data" / "model_store" / "deit-tiny-digits"


def write_tiny_model(directory: Path, num_labels: int = 10, image_size: int = 32, seed: int = 0) -> Path:
    """A random-weight distilled DeiT in HF format, written by transformers itself, with a preprocessor config."""
    import torch
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(seed)
    labels = {i: f"class_{i}" for i in range(num_labels)}
    config = DeiTConfig(
        image_size=image_size,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    DeiTForImageClassificationWithTeacher(config).eval().save_pretrained(directory)
    preprocess = {"size": image_size + 4, "crop_size": image_size, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocess))
    return directory


def image_bytes(
    size: tuple[int, int] = (48, 40), color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG"
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` every 10 ms until it holds; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(0.01)


@dataclass
class ServerProcess:
    """A ``python -m service`` child process; ``url`` is its base URL."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, object]]:
        records = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)


def wait_ready(url: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 60.0) -> None:
    """Poll /readyz until 200 (bounded), failing early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before becoming ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@contextmanager
def run_server(
    store: Path, tmp_path: Path, env: Mapping[str, str] | None = None, args: list[str] | None = None,
    wait: bool = True, ready_timeout: float = 60.0,
) -> Iterator[ServerProcess]:  # fmt: skip
    """Start ``python -m service`` on a free port with ``DEIT_*`` settings; always stopped afterwards."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DEIT_")}
    full_env.update({"DEIT_MODEL_STORE": str(store), "DEIT_PORT": str(port), "DEIT_HOST": "127.0.0.1"})
    full_env.update(env or {})
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", *(args or [])], env=full_env, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path, full_env)
    try:
        if wait:
            wait_ready(server.url, process, timeout=ready_timeout)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def spawn_server(store: Path, tmp_path: Path, port: int, env: Mapping[str, str] | None = None) -> ServerProcess:
    """Start ``python -m service`` on a given ``port`` (a replica its balancer expects there) and return at once;
    the caller stops it (``stop_process``). Each start on a port gets its own log file."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DEIT_")}
    full_env.update({"DEIT_MODEL_STORE": str(store), "DEIT_PORT": str(port), "DEIT_HOST": "127.0.0.1"})
    full_env.update(env or {})
    starts = len(list(tmp_path.glob(f"server-{port}-*.log")))
    log_path = tmp_path / f"server-{port}-{starts}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], env=full_env, stdout=log_file, stderr=subprocess.STDOUT
        )
    return ServerProcess(process, f"http://127.0.0.1:{port}", log_path, full_env)


def noise_image_bytes(seed: int, size: tuple[int, int] = (40, 36)) -> bytes:
    """A PNG of seeded random pixels: distinct seeds give distinct predictions, unlike flat colours."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
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


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def run_default_server(tmp_path: Path, wait: bool = True) -> Iterator[ServerProcess]:
    """``deit-serve`` as a user starts it: the console script, no model store setting, from an unrelated directory.

    Only the listening address is set (``DEIT_HOST``/``DEIT_PORT``), so the model store is the built-in default.
    """
    executable = Path(sys.executable).parent / "deit-serve"
    if not executable.is_file():
        raise FileNotFoundError(f"{executable} is missing: install the project (scripts/setup) to get the command")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEIT_")}
    env.update({"DEIT_PORT": str(port), "DEIT_HOST": "127.0.0.1"})
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen([str(executable)], env=env, cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path, env)
    try:
        if wait:
            wait_ready(server.url, process)
        yield server
    finally:
        stop_process(process)


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


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from ``VmRSS`` in ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


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
    """Serve ``create_app(settings)`` on ``settings.port`` from a background thread; stopped (drained) afterwards."""
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
