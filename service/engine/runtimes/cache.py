"""The on-disk cache of exported runtime artefacts: one directory per checkpoint digest, runtime version and options.

A second start reads the artefact instead of exporting again. Each entry carries a manifest with the SHA-256 of
every file it holds, checked on every read: an entry that is incomplete, altered or unreadable is rebuilt, never
trusted. Entries are written under a temporary name and renamed into place, so a crash leaves no half entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("deit_serve.runtimes")

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/deit-serve/runtimes`` (``~/.cache`` when unset): outside the model store, which may be
    read-only (a mounted volume)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deit-serve" / "runtimes"


def model_digest(model: nn.Module) -> str:
    """SHA-256 of the model as served (tensor names, shapes, dtypes and bytes, and its config): the same for a
    checkpoint whichever writer saved it, and different for any change of weights."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(repr(config).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def entry_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ArtefactCache:
    """Entries under ``root``, each a directory named by its key."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get_or_build(self, key: str, build: Callable[[Path], Iterable[str]], describe: str) -> Path:
        """The directory of a verified entry ``key``; built by ``build(directory)`` (which writes its files and
        returns their names) when missing or when its files do not match their manifest."""
        entry = self.root / key
        if entry.is_dir():
            problem = self._verify(entry)
            if problem is None:
                log.info("runtime artefact read from the cache", extra={"runtime": describe, "cache": str(entry)})
                return entry
            log.warning(
                "runtime cache entry is damaged (%s); rebuilding it",
                problem,
                extra={"runtime": describe, "cache": str(entry)},
            )
            shutil.rmtree(entry, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            names = list(build(staging))
            manifest = {name: _file_digest(staging / name) for name in names}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
            try:
                staging.rename(entry)
            except OSError:  # another process built it first: theirs is as good
                if self._verify(entry) is not None:
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("runtime artefact exported to the cache", extra={"runtime": describe, "cache": str(entry)})
        return entry

    def discard(self, entry: Path) -> None:
        """Drop an entry that verified but could not be loaded (e.g. written by a broken export)."""
        with contextlib.suppress(OSError):
            shutil.rmtree(entry)

    @staticmethod
    def _verify(entry: Path) -> str | None:
        """None when every file of the manifest is there with its digest, else what is wrong."""
        try:
            manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return f"manifest unreadable: {type(e).__name__}"
        if not isinstance(manifest, dict) or not manifest:
            return "manifest empty"
        for name, digest in manifest.items():
            path = entry / str(name)
            if not path.is_file():
                return f"{name} missing"
            if _file_digest(path) != digest:
                return f"{name} does not match its digest"
        return None
