"""``auto``'s choice, remembered: the runtime and precision a measurement chose for one model on one kind of CPU,
kept in the runtime cache beside the artefacts, so that the next start with the same model, options, package
versions and CPU builds that runtime alone: no second export, no measurement, no candidates held side by side.

The decision is checked before it is used (the remembered runtime must build and agree with float32 torch on the
probes, as on the day it was measured); one that is unreadable, no longer builds or no longer agrees is dropped and
the candidates are measured again. Delete the ``decisions`` folder of the runtime cache to measure again anyway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from service.engine.runtimes.cache import entry_key

log = logging.getLogger("deit_serve.runtimes")

DECISIONS = "decisions"
# Bumped whenever what a decision means changes, so that older ones are measured again.
DECISION_VERSION = "1"


@dataclass(frozen=True)
class Decision:
    runtime: str
    precision: str
    reason: str  # the measurement's own reason: each candidate's img/s and the winner's agreement
    measured_at: str  # UTC, ISO 8601


def cpu_identity() -> str:
    """The kind of CPU: its model name and instruction-set flags (what decides which runtime and precision win),
    and the number of CPUs this process may use."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.MULTILINE)
    name = model.group(1).strip() if model else platform.processor() or platform.machine()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}|{' '.join(sorted(flags.group(1).split())) if flags else ''}|{usable}"


class DecisionStore:
    """One JSON file per decision key under ``<runtime cache>/decisions``."""

    def __init__(self, cache_dir: Path) -> None:
        self.directory = cache_dir / DECISIONS

    @staticmethod
    def key(*parts: str) -> str:
        return entry_key(DECISION_VERSION, *parts, cpu_identity())

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def read(self, key: str) -> Decision | None:
        """The decision kept under ``key``; None when there is none, or when it is unreadable (then dropped)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return Decision(**{name: str(raw[name]) for name in Decision.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = type(e).__name__
            log.warning("runtime decision unreadable (%s); measuring again", why, extra={"cache": str(path)})
            self.forget(key)
            return None

    def write(self, key: str, decision: Decision) -> None:
        """Keep ``decision`` (written under a temporary name and renamed into place); a cache that cannot be
        written is logged, never a failed start."""
        path = self.path(key)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            staging.write_text(json.dumps(asdict(decision), indent=1), encoding="utf-8")
            staging.replace(path)
        except OSError as e:
            log.warning("runtime decision not kept: %s", e, extra={"cache": str(path)})
            with contextlib.suppress(OSError):
                staging.unlink()

    def forget(self, key: str) -> None:
        with contextlib.suppress(OSError):
            self.path(key).unlink()
