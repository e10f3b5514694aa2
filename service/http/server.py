"""uvicorn with a drain phase: on SIGTERM/SIGINT/SIGHUP, /readyz and new work answer 503 at once, accepted requests
finish (up to the drain timeout), then the server stops and the process exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn

from service.engine.lifecycle import Lifecycle, Phase

log = logging.getLogger("deit_serve.server")

# After the drain, how long uvicorn waits for the last answers (those of the batch that was running) to go out.
ANSWER_GRACE_S = 5


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout_s = drain_timeout_s
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's signals plus SIGHUP, whose default action (a terminal or supervisor hanging up) kills the
        process with no drain; the previous handlers come back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = {*uvicorn.server.HANDLED_SIGNALS, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])}
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def fail(self) -> None:
        """Stop with a non-zero exit code (the models could not be loaded)."""
        self.exit_code = 1
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's handler: that one re-raises the signal after shutdown, so the exit status would not be 0.
        if self.lifecycle.phase is Phase.DRAINING or self._loop is None or not self.started:
            self.should_exit = True  # a second signal, or one before start-up finished: stop now
            if self._loop is not None and self._drain_task is not None and self.lifecycle.phase is Phase.DRAINING:
                self._loop.call_soon_threadsafe(self.lifecycle.abandon)
                if sig == signal.SIGINT:  # as uvicorn: a second Ctrl-C also stops waiting for connections
                    self.force_exit = True
            return
        self.lifecycle.begin_drain()
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        inflight = self.lifecycle.inflight
        log.info("draining", extra={"inflight": inflight, "timeout_s": self.drain_timeout_s})
        finished = await self.lifecycle.wait_idle(self.drain_timeout_s)
        if not finished:
            log.warning("drain timeout passed with %d requests in flight", self.lifecycle.inflight)
            self.lifecycle.abandon()
        else:
            log.info("drained")
        self.should_exit = True
