"""One request's lifetime: a single deadline and a single cancel signal, from its first byte to its answer.

Every stage of a request (reading the body, decoding, waiting in the queue, the forward pass) runs under the same
``RequestContext``: each wait is raced against the deadline and the cancel signal, so a request ends at its deadline
or when its client leaves, whatever stage it is in, and work not yet started for it never starts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from service.errors import DeadlineExceeded, ServiceError

if TYPE_CHECKING:
    from service.tracing import RequestTrace

T = TypeVar("T")


class RequestContext:
    """Deadline and cancel signal of one request. Created and cancelled on the event loop; ``stopped`` may be read
    from any thread (decoding threads check it before they start an image)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.error: ServiceError | None = None  # why the request was cancelled, once it was
        self._signal: asyncio.Future[None] | None = None  # resolved on cancel; awaited beside every stage
        self.trace: RequestTrace | None = None  # its span, when tracing is on: its stages add theirs under it

    @classmethod
    def with_timeout(cls, timeout_s: float) -> RequestContext:
        return cls(time.monotonic() + timeout_s)

    def shorten(self, deadline: float) -> None:
        """Bring the deadline forward (a protocol's own timeout, read from the body); never later."""
        self.deadline = min(self.deadline, deadline)

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    @property
    def stopped(self) -> bool:
        """Cancelled, or past its deadline: nothing more should be started for this request."""
        return self.error is not None or self.expired

    def cancel(self, error: ServiceError) -> None:
        """End the request with ``error`` (client gone, service shutting down); the first reason wins."""
        if self.error is not None:
            return
        self.error = error
        if self._signal is not None and not self._signal.done():
            self._signal.set_result(None)

    def check(self, timeout_error: Callable[[], ServiceError] | None = None) -> None:
        """Raise the cancel reason, or the deadline's error, if the request should stop."""
        if self.error is not None:
            raise self.error
        if self.expired:
            raise (timeout_error or _deadline_passed)()

    async def run(self, awaitable: Awaitable[T], timeout_error: Callable[[], ServiceError] | None = None) -> T:
        """Await ``awaitable`` until the deadline or the cancel signal, whichever comes first. On either, it is
        cancelled and the reason raised (``timeout_error()`` for the deadline, default: 504). A request already
        stopped never starts ``awaitable``, and never leaves it unobserved either."""
        try:
            self.check(timeout_error)
        except ServiceError:
            _discard(awaitable)
            raise
        task = asyncio.ensure_future(awaitable)
        if self._signal is None:
            self._signal = asyncio.get_running_loop().create_future()
        waiters: set[asyncio.Future[Any]] = {task, self._signal}
        try:
            done, _ = await asyncio.wait(waiters, timeout=self.remaining(), return_when="FIRST_COMPLETED")
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        task.add_done_callback(_consume)
        if self.error is None:  # the deadline: from now on the request is stopped, whatever the clock says
            self.cancel((timeout_error or _deadline_passed)())
        assert self.error is not None
        raise self.error


def _deadline_passed() -> ServiceError:
    return DeadlineExceeded("the request deadline passed before its images were classified")


def _discard(awaitable: Awaitable[Any]) -> None:
    """Drop an awaitable that will never be awaited: a coroutine is closed unstarted, a future (a gather of the
    request's jobs) is cancelled and its outcome read, so that asyncio logs neither as never awaited/retrieved."""
    if asyncio.iscoroutine(awaitable):
        awaitable.close()
    elif asyncio.isfuture(awaitable):
        awaitable.cancel()
        awaitable.add_done_callback(_consume)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
