"""The wheel is the product as users install it: it carries the demo model, and nothing of the repository's tooling."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx
import pytest

from harness.launcher import running
from service.settings import DEFAULT_MODEL_STORE
from tests.serving import DEMO_MODEL, REPO, free_port

# Build outputs, tool caches and local checkpoints a working tree may hold at its root; the copy the wheel is built
# from leaves them out (and byte code everywhere).
_NOT_SOURCES = frozenset(
    [".git", ".venv", "build", "dist", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "models"]
)


def _not_sources(directory: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    return skip | (_NOT_SOURCES & set(names) if Path(directory) == REPO else set())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built by pip from a copy of the whole tree (so the repository stays free of build/)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(REPO, source, ignore=_not_sources)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    result = subprocess.run(
        [*pip_wheel, str(source), "-w", str(root / "dist")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = (root / "dist").glob("deit_serve-*.whl")
    return built


def test_the_default_model_store_is_inside_the_package() -> None:
    """Found from the installed package itself, never from the working directory or a source checkout."""
    package = Path(sys.modules["service"].__file__ or "").resolve().parent
    assert DEFAULT_MODEL_STORE.is_relative_to(package)
    assert DEMO_MODEL.parent == DEFAULT_MODEL_STORE
    assert [p.name for p in DEFAULT_MODEL_STORE.iterdir() if p.is_dir()] == [DEMO_MODEL.name]


def test_wheel_holds_the_service_and_the_whole_demo_model_and_no_repository_tooling(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {name.split("/", 1)[0] for name in names} == {"service", dist_info}, names
    assert not [
        n
        for n in names
        if "/tests/" in n or "/scripts/" in n or "benchmarks" in n or "harness" in n or n.endswith(".pyc")
    ]
    demo_files = sorted(p.relative_to(REPO).as_posix() for p in DEMO_MODEL.rglob("*") if p.is_file())
    assert demo_files, DEMO_MODEL
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
        Path(f).name for f in demo_files
    }
    missing = [f for f in demo_files if f not in names]
    assert not missing, f"demo model files left out of the wheel: {missing}"
    assert "service/data/imagenet1k_labels.txt" in names
    assert "service/py.typed" in names


@pytest.mark.slow
def test_installed_wheel_serves_the_demo_model_from_the_filesystem_root(wheel: Path, tmp_path: Path) -> None:
    """`pip install <wheel> && deit-serve`, run from `/` with no setting but the address, classifies the samples.

    The wheel goes into a fresh virtualenv without its dependencies; a .pth file lends it this environment's
    installed packages (torch and the rest) so nothing is downloaded. The source tree is kept off the path.
    """
    # The user's environment: no DEIT_* setting, and no PYTHONPATH that would put a source tree first.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEIT_", "PYTHON"))}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    assert "Successfully installed deit-serve" in install.stdout, install.stdout
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    lent = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (Path(site) / "deit-serve-test-dependencies.pth").write_text("".join(f"{p}\n" for p in lent))

    port = free_port()
    env.update({"DEIT_HOST": "127.0.0.1", "DEIT_PORT": str(port)})
    where = subprocess.run(
        [str(python), "-c", "import service.settings as s; print(s.__file__); print(s.DEFAULT_MODEL_STORE)"],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr
    module_file, store = (Path(line) for line in where.stdout.split())
    assert module_file.is_relative_to(Path(site)), f"service imported from {module_file}, not the installed wheel"
    assert store.is_relative_to(Path(site)), store
    samples = sorted((store / DEMO_MODEL.name / "samples").glob("*.png"))
    assert len(samples) == len(list((DEMO_MODEL / "samples").glob("*.png"))) > 0, samples

    deit_serve = [str(venv / "bin" / "deit-serve")]
    log_path = tmp_path / "deit-serve.log"
    with running(deit_serve, port=port, log_path=log_path, env=env, cwd="/", ready_timeout=180) as server:
        url = server.url
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["models"]
        assert [(m["name"], m["default"]) for m in models] == [(DEMO_MODEL.name, True)]
        files = [("file", (p.name, p.read_bytes(), "image/png")) for p in samples]
        response = httpx.post(f"{url}/classify", files=files, timeout=60)
        assert response.status_code == 200, response.text
        top1 = {r["filename"]: r["predictions"][0]["label"] for r in response.json()["results"]}
        assert top1 == {p.name: p.name.split("_")[0] for p in samples}
    assert server.process.returncode == 0, server.log()
