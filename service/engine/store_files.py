"""What the model store directory holds (models, their numbered versions, a fingerprint of each version's files),
and the opt-in poller that hands its changes to the repository (``service.engine.repository``).

Layout: ``<store>/<model>/<N>/…`` (numeric version folders), or a model directory or ``.pth`` without version
folders, which is version 1. A version's fingerprint is its files' paths, sizes and modification times: a new
version folder or a changed file gives a new fingerprint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from service.errors import ModelStoreError
from service.model.checkpoints import PTH_SUFFIXES

log = logging.getLogger("deit_serve.repository")

Fingerprint = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class VersionSource:
    """One version of a model on disk: where to load it from, and the state of its files."""

    path: Path
    fingerprint: Fingerprint


StoreContents = dict[str, dict[int, VersionSource]]


def model_entries(store: Path) -> list[tuple[str, Path]]:
    """Model directories and ``.pth``-like files of the store, named by directory or file stem, sorted."""
    if not store.is_dir():
        raise ModelStoreError(f"model store {store} is not a directory")
    found: list[tuple[str, Path]] = []
    for entry in sorted(store.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() or (entry.is_file() and entry.suffix in PTH_SUFFIXES):
            found.append((entry.stem if entry.is_file() else entry.name, entry))
    names = [n for n, _ in found]
    if len(set(names)) != len(names):
        raise ModelStoreError(f"model store {store} has two models with the same name: {names}")
    return found


def fingerprint(path: Path) -> Fingerprint:
    """Relative path, size and mtime (ns) of every file under ``path`` (or of ``path`` itself), hidden ones aside."""
    if path.is_file():
        stat = path.stat()
        return ((path.name, stat.st_size, stat.st_mtime_ns),)
    files = []
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        stat = file.stat()
        files.append((relative.as_posix(), stat.st_size, stat.st_mtime_ns))
    return tuple(files)


def model_versions(path: Path) -> dict[int, VersionSource]:
    """The versions of one model: its numeric sub-directories, or the model itself as version 1."""
    if path.is_dir():
        numbered = {int(d.name): d for d in path.iterdir() if d.is_dir() and d.name.isascii() and d.name.isdigit()}
        if numbered:
            return {n: VersionSource(d, fingerprint(d)) for n, d in sorted(numbered.items())}
    return {1: VersionSource(path, fingerprint(path))}


def scan_store(store: Path) -> StoreContents:
    """Every model and version of the store as it is now (blocking file-system reads: run off the event loop)."""
    return {name: model_versions(path) for name, path in model_entries(store)}


def scan_model(store: Path, name: str) -> dict[int, VersionSource] | None:
    """The versions of the model ``name`` on disk, or None when the store holds no such model."""
    path = next((p for n, p in model_entries(store) if n == name), None)
    return None if path is None else model_versions(path)


async def poll_store(
    store: Path, interval_s: float, apply: Callable[[StoreContents], Awaitable[None]]
) -> None:  # fmt: skip
    """Every ``interval_s``, scan the store and hand a changed state to ``apply`` once it has been seen twice in a
    row, so that a version folder still being copied is not loaded half-written."""
    previous: StoreContents | None = None
    applied: StoreContents | None = None
    while True:
        await asyncio.sleep(interval_s)
        try:
            current = await asyncio.to_thread(scan_store, store)
        except (OSError, ModelStoreError) as e:  # a directory removed mid-scan, two models of one name: next time
            log.warning("model store scan failed: %s", e, extra={"store": str(store)})
            previous = None
            continue
        if current == previous and current != applied:
            try:
                await apply(current)
            except Exception:
                log.exception("applying model store changes failed", extra={"store": str(store)})
            applied = current
        previous = current
