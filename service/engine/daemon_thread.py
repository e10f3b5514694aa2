"""Blocking work (a model's load and warm-up) on a daemon thread, awaited from the event loop.

Not an executor's thread: those are joined when the interpreter exits, so a warm-up that runs for hours would keep
a drained server alive for hours. A daemon thread is abandoned at exit; its result, if it ever comes, is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def run_in_daemon_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Start ``fn()`` on a new daemon thread; the future gets its result or error (unless cancelled first)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], Any]) -> None:
        if not future.done():
            outcome()

    def target() -> None:
        try:
            result = fn()
        except BaseException as e:  # handed to the awaiting coroutine, which names it
            error = e
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(target=target, name=name, daemon=True).start()
    return future
