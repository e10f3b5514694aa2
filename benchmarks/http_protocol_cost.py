"""What the service's HTTP limits cost per request, without sockets, clients or a model in the measurement.

One keep-alive connection of each protocol class (uvicorn's ``HttpToolsProtocol``, the service's
``LimitedHttpToolsProtocol``) is fed the same ``POST /classify`` head and 3 KB body many times, on uvloop, with a
transport that drops what is written and an ASGI app that answers at once; the classes alternate over ``--rounds``
and the minimum of each is the figure least disturbed by other work on the machine. The closed-loop benchmark
(``benchmarks.http_stack``) measures the same difference end to end, but on a shared machine its noise is larger
than the difference.

    .venv/bin/python -m benchmarks.http_protocol_cost --requests 5000 --rounds 15
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.http.limits import HttpLimits
from service.http.protocol import limited_protocol

BODY = b"x" * 3000
REQUEST = (
    b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: python-httpx/0.28\r\nAccept: */*\r\n"
    b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n"
    b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: %d\r\n\r\n" % len(BODY)
) + BODY


async def _app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


class _NullTransport(asyncio.Transport):
    """Accepts every write and drops it; reports a loopback peer."""

    def __init__(self) -> None:
        super().__init__()
        self._closing = False

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _microseconds_per_request(protocol_class: type[HttpToolsProtocol], requests: int) -> float:
    config = Config(_app, log_config=None, access_log=False)
    config.load()
    state = ServerState()
    protocol = protocol_class(config=config, server_state=state, app_state={})
    protocol.connection_made(_NullTransport())
    started = time.perf_counter()
    for _ in range(requests):
        protocol.data_received(REQUEST)
        await asyncio.gather(*state.tasks)  # the one request's task: it ends once the answer is written
    elapsed = time.perf_counter() - started
    protocol.connection_lost(None)
    return elapsed / requests * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=5000, help="requests per connection and round")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    classes: dict[str, type[HttpToolsProtocol]] = {
        "uvicorn HttpToolsProtocol": HttpToolsProtocol,
        "LimitedHttpToolsProtocol": limited_protocol(HttpLimits(64 * 1024, 100, 10.0, 1024)),
    }
    us: dict[str, list[float]] = {name: [] for name in classes}
    for r in range(args.rounds):
        order = list(classes.items())
        for name, cls in order if r % 2 else reversed(order):  # alternate who goes first
            us[name].append(uvloop.run(_microseconds_per_request(cls, args.requests)))
    print(f"\n{args.requests} keep-alive requests per round, {args.rounds} rounds, uvloop\n")
    print("| protocol | min µs / request | median µs / request |")
    print("|---|--:|--:|")
    for name, values in us.items():
        print(f"| {name} | {min(values):.1f} | {statistics.median(values):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
