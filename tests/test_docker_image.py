"""The Docker image end to end: build it, serve the embedded demo model, classify a sample, expose metrics, and
drain and exit 0 on SIGTERM.

Needs a Docker engine. Where the project's ``shared/docker/make-base-image.sh`` exists (machines that reach no
container registry) it is run as root to start the engine and build a local Debian + Python 3.11 base image;
elsewhere ``DEIT_BASE_IMAGE`` or the Dockerfile's default (python:3.11-slim) is the base. Without CI, a machine
that cannot run it skips this test; with ``CI`` set it fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

from harness.launcher import wait_ready

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "service" / "data" / "model_store" / "deit-tiny-digits" / "samples"
IMAGE = "deit-serve:test"
# A cold machine builds the base image and downloads PyTorch and every dependency.
BASE_IMAGE_TIMEOUT_S = 1800
BUILD_TIMEOUT_S = 2400
READY_TIMEOUT_S = 180.0
HEALTHY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 10
# docker stop sends SIGKILL after this; the drain must end well before.
STOP_GRACE_S = DRAIN_TIMEOUT_S + 20


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    base: str
    build_s: float
    size_bytes: int
    base_size_bytes: int


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"the Docker image test must run in CI, but {reason}")
    pytest.skip(reason)


def _docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def _docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    return _docker("info", "--format", "{{.ServerVersion}}", timeout=60, check=False).returncode == 0


def _base_image_script() -> Path | None:
    candidates = [ROOT.parent / "shared" / "docker" / "make-base-image.sh"]
    if explicit := os.environ.get("DEIT_BASE_IMAGE_SCRIPT"):
        candidates.insert(0, Path(explicit))
    return next((path for path in candidates if path.is_file()), None)


def _base_image() -> str:
    """The BASE_IMAGE build argument, with a Docker engine running."""
    if explicit := os.environ.get("DEIT_BASE_IMAGE"):
        if not _docker_works():
            _unavailable("no Docker engine answers")
        return explicit
    script = _base_image_script()
    if script is not None and os.geteuid() == 0:
        # Installs and starts the engine where needed, then builds (or finds) the local base image; prints its tag.
        result = subprocess.run(
            ["bash", str(script)], capture_output=True, text=True, timeout=BASE_IMAGE_TIMEOUT_S, check=False
        )
        if result.returncode != 0:
            pytest.fail(f"{script} exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout.strip().splitlines()[-1]
    if not _docker_works():
        _unavailable("no Docker engine answers, and building the local base image needs root")
    return "python:3.11-slim"


def _image_size(tag: str) -> int:
    return int(_docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    base = _base_image()
    log_path = tmp_path_factory.mktemp("docker") / "build.log"
    started = time.monotonic()
    with log_path.open("w") as log:
        result = subprocess.run(
            ["docker", "build", "--build-arg", f"BASE_IMAGE={base}", "--tag", IMAGE, str(ROOT)],
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    build_s = time.monotonic() - started
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"docker build exited {result.returncode}:\n{tail}")
    return BuiltImage(IMAGE, base, build_s, _image_size(IMAGE), _image_size(base))


@pytest.fixture
def container() -> Iterator[str]:
    """A name for the container under test; the container is removed afterwards whatever happened."""
    name = f"deit-serve-test-{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        _docker("rm", "--force", "--volumes", name, check=False)


def _state(name: str, field: str) -> str:
    return _docker("inspect", "--format", "{{" + field + "}}", name).stdout.strip()


def _logs(name: str) -> str:
    result = _docker("logs", "--tail", "60", name, check=False)
    return result.stdout + result.stderr


def _published_url(name: str) -> str:
    lines = _docker("port", name, "8000/tcp").stdout.split()
    address = next(line for line in lines if line.startswith("127.0.0.1:"))
    return f"http://{address}"


def _wait_ready(name: str, url: str) -> None:
    try:
        wait_ready(url, timeout=READY_TIMEOUT_S, alive=lambda: _state(name, ".State.Running") == "true", every=0.5)
    except RuntimeError:
        pytest.fail(f"the container exited ({_state(name, '.State.ExitCode')}) before it was ready:\n{_logs(name)}")
    except TimeoutError as e:
        pytest.fail(f"{e}:\n{_logs(name)}")


def _wait_healthy(name: str) -> str:
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    status = ""
    while time.monotonic() < deadline:
        status = _state(name, ".State.Health.Status")
        if status in ("healthy", "unhealthy"):
            break
        time.sleep(1.0)
    return status


def _sample() -> Path:
    preferred = SAMPLES / "7_a.png"
    if preferred.is_file():
        return preferred
    samples = sorted(SAMPLES.glob("[0-9]*.png"))
    assert samples, f"no samples in {SAMPLES}"
    return samples[0]


def test_image_serves_the_demo_model_and_drains_on_sigterm(
    image: BuiltImage, container: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mib = 1024 * 1024
    with capsys.disabled():
        print(
            f"\n{image.tag}: {image.size_bytes / mib:.0f} MiB ({(image.size_bytes - image.base_size_bytes) / mib:.0f} "
            f"MiB on top of {image.base}, {image.base_size_bytes / mib:.0f} MiB); built in {image.build_s:.0f} s"
        )
    user = _docker("image", "inspect", "--format", "{{.Config.User}}", image.tag).stdout.strip()
    assert user.split(":")[0] not in ("", "0", "root"), f"the image runs as {user!r}"

    _docker(
        "run", "--detach", "--name", container,
        "--publish", "127.0.0.1::8000",
        "--env", "DEIT_DEVICE=cpu",
        "--env", f"DEIT_DRAIN_TIMEOUT_S={DRAIN_TIMEOUT_S}",
        # The image's own health check command, probed more often than its production interval.
        "--health-interval", "2s", "--health-start-period", "60s",
        image.tag,
    )  # fmt: skip
    url = _published_url(container)
    _wait_ready(container, url)

    models = httpx.get(f"{url}/v1/models", timeout=10.0).json()["models"]
    assert [m["name"] for m in models] == ["deit-tiny-digits"]

    sample = _sample()
    response = httpx.post(
        f"{url}/classify",
        files={"file": (sample.name, sample.read_bytes(), "image/png")},
        params={"top_k": 3},
        timeout=30.0,
    )
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    top = result["predictions"][0]
    assert top["label"] == sample.name.split("_")[0], f"{sample.name} classified as {result['predictions']}"

    metrics = httpx.get(f"{url}/metrics", timeout=10.0).text
    assert re.search(r'^deit_requests_total\{[^}]*endpoint="/classify"[^}]*status="200"[^}]*\} 1\.0$', metrics, re.M), (
        metrics
    )

    assert _wait_healthy(container) == "healthy", _docker("inspect", "--format", "{{json .State.Health}}", container)

    # SIGTERM: drain, exit 0, and well before docker stop falls back to SIGKILL.
    started = time.monotonic()
    _docker("stop", "--time", str(STOP_GRACE_S), container, timeout=STOP_GRACE_S + 30)
    stopped_s = time.monotonic() - started
    logs = _logs(container)
    assert _state(container, ".State.ExitCode") == "0", logs
    assert _state(container, ".State.OOMKilled") == "false"
    assert stopped_s < DRAIN_TIMEOUT_S + 5, f"took {stopped_s:.1f} s to stop:\n{logs}"
    assert "Traceback" not in logs, logs
    with capsys.disabled():
        print(f"classified {sample.name} as {top['label']} ({top['score']:.3f}); stopped in {stopped_s:.1f} s, exit 0")
