"""A budget of request-body bytes held in memory at once, across all requests.

Each request reserves the bytes it will hold before they are read: its declared ``Content-Length`` up front, or,
for a body of unknown length, chunk by chunk as it arrives. A reservation that does not fit is refused at once (503
with ``Retry-After``), so many slow uploads in flight cannot grow memory without bound.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import Gauge

from service.errors import Overloaded

# With no budget set: room for this many largest uploads at once, but no more than this share of the memory.
_DEFAULT_UPLOADS = 8
_MEMORY_SHARE = 1 / 8


def memory_limit_bytes() -> int:
    """Physical memory, or the cgroup's limit when it is lower (containers)."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            limit = int(Path(path).read_text().strip())
            if 0 < limit < physical:
                return limit
    return physical


def default_budget_bytes(max_upload_bytes: int) -> int:
    """8 largest uploads (160 MiB by default), capped at an eighth of the memory, and never below one upload."""
    return max(max_upload_bytes, min(_DEFAULT_UPLOADS * max_upload_bytes, int(memory_limit_bytes() * _MEMORY_SHARE)))


class UploadBudget:
    """Bytes reserved by the requests in flight; all methods run on the event loop."""

    def __init__(self, limit_bytes: int, gauge: Gauge | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.reserved = 0
        self._gauge = gauge

    def _add(self, n: int) -> None:
        self.reserved += n
        if self._gauge is not None:
            self._gauge.set(self.reserved)

    @contextlib.contextmanager
    def reservation(self) -> Iterator[Reservation]:
        """A request's share of the budget, given back when the request ends."""
        held = Reservation(self)
        try:
            yield held
        finally:
            self._add(-held.bytes)
            held.bytes = 0


class Reservation:
    def __init__(self, budget: UploadBudget) -> None:
        self._budget = budget
        self.bytes = 0

    def grow(self, n: int) -> None:
        """Reserve ``n`` more bytes, or refuse (503) when the budget has no room for them."""
        budget = self._budget
        if budget.reserved + n > budget.limit_bytes:
            raise Overloaded(
                f"the service holds {budget.reserved} bytes of uploads in flight (limit {budget.limit_bytes}); "
                "retry shortly"
            )
        budget._add(n)
        self.bytes += n
