"""The decoding threads, shared fairly between requests.

Requests take turns, one image at a time: a request with many slow images cannot hold every thread while a small
request waits behind all of them, and the images of a request that was cancelled or passed its deadline are never
started (an image already being decoded runs to its end, bounded by the pixel limits, and its result is dropped).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service.engine.context import RequestContext

T = TypeVar("T")


@dataclass(eq=False)
class _Job(Generic[T]):
    fn: Callable[[], T]
    future: asyncio.Future[T]


@dataclass(eq=False)
class _Turn:
    """The jobs of one request that have not started yet."""

    context: RequestContext
    jobs: deque[_Job[Any]] = field(default_factory=deque)


class DecodePool:
    """A fixed set of threads; all methods run on the event loop, only the jobs run in the threads."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="preprocess")
        self._turns: deque[_Turn] = deque()
        self._running = 0

    def submit(self, context: RequestContext, fns: Sequence[Callable[[], T]]) -> list[asyncio.Future[T]]:
        """Queue one request's jobs; their futures resolve as each job runs (or are cancelled if it never does)."""
        loop = asyncio.get_running_loop()
        turn = _Turn(context, deque(_Job(fn, loop.create_future()) for fn in fns))
        futures = [job.future for job in turn.jobs]
        if turn.jobs:
            self._turns.append(turn)
            self._dispatch()
        return futures

    async def run(self, context: RequestContext, fn: Callable[[], T]) -> T:
        """Run one job in its request's turn (parsing a large body, say), under the request's deadline."""
        [job] = self.submit(context, [fn])
        try:
            return await context.run(job)
        finally:
            job.cancel()

    def _dispatch(self) -> None:
        while self._running < self.threads and self._turns:
            turn = self._turns.popleft()
            job = turn.jobs.popleft()
            if turn.jobs:
                self._turns.append(turn)  # the next image of this request waits for its next turn
            if job.future.done():  # the request gave up on it
                continue
            if turn.context.stopped:
                job.future.cancel()
                continue
            self._running += 1
            running = asyncio.get_running_loop().run_in_executor(self._executor, job.fn)
            running.add_done_callback(lambda done, job=job: self._finished(job, done))  # type: ignore[misc]

    def _finished(self, job: _Job[Any], done: asyncio.Future[Any]) -> None:
        self._running -= 1
        if not job.future.done():
            if done.cancelled():
                job.future.cancel()
            elif (error := done.exception()) is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(done.result())
        elif not done.cancelled():
            done.exception()  # read, so that an error nobody waits for is not reported as never retrieved
        self._dispatch()

    def shutdown(self) -> None:
        for turn in self._turns:
            for job in turn.jobs:
                job.future.cancel()
        self._turns.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
