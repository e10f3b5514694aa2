"""uvicorn's httptools protocol with bounds a client cannot push past, and JSON on every answer the server writes.

uvicorn alone parses a request head of any size and any number of headers, holds a connection that never sends a
complete head (its keep-alive timer starts only after a first response), accepts connections without limit, and
answers parser errors in text/plain. This subclass caps the head (431), gives it a deadline (408, or a silent close
when nothing was sent), refuses connections above a cap (503), and writes those answers as the service's JSON
errors. Only connection set-up and the request head pay for the checks; a body is fed to the parser as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.http.limits import HttpLimits, error_response

log = logging.getLogger("deit_serve.http")

# After an error answer, the connection stays half-open this long, reading and dropping what the client sends, so
# that the client reads the answer instead of a reset.
LINGER_S = 2.0
# At most one "connection refused" warning per this many seconds: a flood must not become a flood of log lines.
REFUSE_LOG_INTERVAL_S = 10.0


class HeadTooLarge(Exception):
    """Raised from the parser's headers-complete callback to refuse a head with too many header fields."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """One HTTP/1.1 connection; ``limits`` is set on the subclass that :func:`limited_protocol` makes."""

    limits: ClassVar[HttpLimits]
    _last_refusal_log: ClassVar[float] = 0.0

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._in_head = True  # the bytes that come next belong to a request head
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._closing = False

    # --- connection ------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that never sends a head is closed, not held

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _refuse(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        now = time.monotonic()
        if now - LimitedHttpToolsProtocol._last_refusal_log >= REFUSE_LOG_INTERVAL_S:
            LimitedHttpToolsProtocol._last_refusal_log = now
            log.warning("refusing connections: %d open, the limit", self.limits.max_connections)
        message = f"the server holds its limit of {self.limits.max_connections} connections; retry later"
        self._answer_and_close(503, "too_many_connections", message, retry_after=1)

    def _answer_and_close(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        """Write a JSON error, then stop reading requests: input is dropped until the client closes or the linger
        time ends (closing a socket with unread input sends RST, which can discard the answer at the client)."""
        self._closing = True
        self._cancel_head_timer()
        transport = self.transport
        transport.write(error_response(status, code, message, self.server_state.default_headers, retry_after))
        if transport.can_write_eof():
            transport.write_eof()
            self._head_timer = self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    # --- request head ----------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # answered and closing: input is dropped until the client closes or the linger time ends
        view: bytes | memoryview = data
        while self._in_head:
            budget = self.limits.max_header_bytes - self._head_bytes
            if len(view) <= budget:
                self._head_bytes += len(view)
                self._feed(view)
                if self._in_head and self._head_bytes and self._head_timer is None and not self._closing:
                    # Part of a head came and the rest did not: from here it has the header timeout to arrive.
                    # A head that arrives whole (the usual case) costs no timer.
                    self._arm_head_timer()
                return
            # Feed only what the head may still take: the parser buffers a header line in full before any callback,
            # so a too-long head must be cut off here, not after it has been held.
            if budget > 0:
                self._head_bytes += budget
                view = memoryview(view)
                self._feed(view[:budget])
                view = view[budget:]
            if self._closing or self.transport.is_closing():
                return
            if self._in_head:
                self._reject(
                    431,
                    "headers_too_large",
                    f"the request head (request line and headers) is larger than {self.limits.max_header_bytes} bytes",
                )
                return
        self._feed(view)

    def _feed(self, data: bytes | memoryview) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HeadTooLarge):
                self._reject(431, "headers_too_large", str(exc.__context__))
            else:
                log.warning("invalid HTTP request: %r", exc.__context__ or exc)
                self._reject(400, "bad_request", "malformed HTTP request")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            log.warning("invalid HTTP request: %s", exc)
            self._reject(400, "bad_request", f"malformed HTTP request: {exc}")

    def send_400_response(self, msg: str) -> None:
        self._reject(400, "bad_request", msg)

    def _reject(self, status: int, code: str, message: str) -> None:
        """Answer a request the parser refused, and close. An application still reading that request's body is told
        the client is gone; a response already being written is cut off rather than interleaved with this one."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                self.transport.close()
                return
            cycle.disconnected = True
            cycle.message_event.set()
        self._answer_and_close(status, code, message)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        # Counted once the head is read, not per header: the head's byte limit already bounds what was held, and a
        # check per header field costs every request a Python call per header.
        if len(self.headers) > self.limits.max_headers:
            raise HeadTooLarge(f"the request has more than {self.limits.max_headers} header fields")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    # --- head deadline ---------------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # a response is on its way; the keep-alive timer takes over after it
        if self._head_bytes == 0:
            self.transport.close()  # nothing sent: an idle connection, closed without an answer
            return
        message = f"the request head was not complete within {self.limits.header_timeout_s:g} s"
        self._reject(408, "request_timeout", message)


def limited_protocol(limits: HttpLimits) -> type[LimitedHttpToolsProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``, bound to ``limits``."""

    class BoundProtocol(LimitedHttpToolsProtocol):
        pass

    BoundProtocol.limits = limits
    return BoundProtocol
