"""Service phases (starting → ready → draining) and the count of requests in flight, for /readyz and drain."""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable, Iterator

from service.engine.context import RequestContext
from service.errors import NotReady, ShuttingDown


class Phase(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class Lifecycle:
    """Set from the lifespan and the signal handler; read by every classification request."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.error: str | None = None
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._abandon_hooks: list[Callable[[], None]] = []
        self._requests: set[RequestContext] = set()

    @property
    def inflight(self) -> int:
        return self._inflight

    def check_accepting(self) -> None:
        if self.phase is Phase.DRAINING:
            raise ShuttingDown("the service is shutting down; retry on another instance")
        if self.phase is not Phase.READY:
            raise NotReady("the service is still loading its models")

    def begin_drain(self) -> None:
        """Stop taking work (safe to call from a signal handler: it only flips the phase)."""
        self.phase = Phase.DRAINING

    def on_abandon(self, hook: Callable[[], None]) -> None:
        """Register what fails the work still waiting when the drain runs out of time."""
        self._abandon_hooks.append(hook)

    def abandon(self) -> None:
        """The drain timeout passed: answer every request in flight now (503), in whatever stage it is (still
        sending its body, decoding, queued), instead of letting the server cut their connections."""
        for hook in self._abandon_hooks:
            hook()
        for context in list(self._requests):
            context.cancel(ShuttingDown("the service is shutting down before this request could finish; retry"))

    @contextlib.contextmanager
    def request(self, context: RequestContext) -> Iterator[None]:
        """Count a request as in flight for its whole duration; an abandoned drain cancels it."""
        self._inflight += 1
        self._requests.add(context)
        if self._idle is not None:
            self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            self._requests.discard(context)
            if self._inflight == 0 and self._idle is not None:
                self._idle.set()

    async def wait_idle(self, within_s: float) -> bool:
        """Wait until no request is in flight; False when ``within_s`` seconds passed first."""
        if self._idle is None:
            self._idle = asyncio.Event()
        if self._inflight == 0:
            return True
        self._idle.clear()
        try:
            async with asyncio.timeout(within_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
