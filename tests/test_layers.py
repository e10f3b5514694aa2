"""The package layout is the architecture: imports run one way, and the engine and model never see the web."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parent.parent / "service"
WEB = ("fastapi", "starlette", "uvicorn", "httptools", "python_multipart")


def imports_of(path: Path, root: Path = SERVICE.parent) -> set[str]:
    """Every module a file imports, by absolute name (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def modules(layer: str) -> list[Path]:
    return sorted((SERVICE / layer).rglob("*.py"))


def test_every_layer_has_modules() -> None:
    for layer in ("api", "http", "engine", "model"):
        assert modules(layer), layer


@pytest.mark.parametrize("layer", ["engine", "model"])
def test_engine_and_model_never_import_the_web_or_the_front_doors(layer: str) -> None:
    offenders = {
        f"{path.relative_to(SERVICE.parent)}: {name}"
        for path in modules(layer)
        for name in imports_of(path)
        if name.split(".")[0] in WEB or name.startswith(("service.api", "service.http", "service.app", "service.cli"))
    }
    assert not offenders


def test_model_never_imports_the_engine_or_the_settings() -> None:
    offenders = {
        f"{path.relative_to(SERVICE.parent)}: {name}"
        for path in modules("model")
        for name in imports_of(path)
        if name.startswith(("service.engine", "service.settings"))
    }
    assert not offenders


# The edge shares two torch-free pieces of the engine: a request's deadline and cancel signal, and the service's phases.
EDGE_SHARED = ("service.engine.context", "service.engine.lifecycle")


def test_the_http_edge_touches_no_model_and_no_front_door() -> None:
    offenders = {
        f"{path.relative_to(SERVICE.parent)}: {name}"
        for path in modules("http")
        for name in imports_of(path)
        if name.split(".")[0] == "torch"
        or name.startswith(("service.model", "service.api"))
        or (name.startswith("service.engine") and not name.startswith(EDGE_SHARED))
    }
    assert not offenders


def test_what_the_edge_shares_with_the_engine_imports_no_torch() -> None:
    for module in EDGE_SHARED:
        path = SERVICE.parent / (module.replace(".", "/") + ".py")
        assert not {name for name in imports_of(path) if name.split(".")[0] in ("torch", "numpy", *WEB)}, module


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    """The rule is read from real import statements, relative ones included."""
    probe = tmp_path / "service" / "engine" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..api import admission\nimport fastapi\nfrom . import batching\n")
    assert {"service.api.admission", "fastapi", "service.engine.batching"} <= imports_of(probe, tmp_path)
