"""Memory held by stalled uploads: N connections each declare a large body, send most of it, and stop.

Starts ``python -m service`` on the embedded demo model with its default settings (or ``--set name=value``),
opens the connections one after the other on loopback, and prints the server's RSS growth and how many uploads
were refused (503 before being read) rather than held::

    .venv/bin/python -m benchmarks.stalled_uploads --connections 30 --upload-mib 19
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

from benchmarks.loadgen import ServerSpec, running
from harness.load import rss_bytes

CHUNK = 256 * 1024


def stall(address: tuple[str, int], declared: int, send: int) -> tuple[socket.socket, bool]:
    """Open one upload; True when the server refused it (closed or answered) before ``send`` bytes went out."""
    sock = socket.create_connection(address)
    sock.sendall(
        f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {declared}\r\n\r\n".encode()
    )
    sock.settimeout(5)
    sent = 0
    try:
        while sent < send:
            sock.sendall(bytes(CHUNK))
            sent += CHUNK
    except OSError:
        return sock, True
    return sock, False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=30)
    parser.add_argument("--upload-mib", type=float, default=19.0, help="bytes sent on each connection")
    parser.add_argument("--declared-mib", type=float, default=20.0, help="Content-Length of each upload")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a DEIT_* setting")
    args = parser.parse_args(argv)
    env = {"DEIT_PORT": "{port}", "DEIT_HOST": "127.0.0.1"}
    env.update({f"DEIT_{k.upper()}": v for k, v in (s.split("=", 1) for s in args.set)})
    spec = ServerSpec("deit-serve", [sys.executable, "-m", "service"], "/readyz", "/classify", env)
    log = Path("/tmp") / "stalled-uploads-server.log"
    with running(spec, log) as server:
        host, port = server.url.removeprefix("http://").split("/")[0].split(":")
        time.sleep(1.0)
        before = rss_bytes(server.pgid)
        held, refused = [], 0
        started = time.monotonic()
        for _ in range(args.connections):
            sock, was_refused = stall((host, int(port)), int(args.declared_mib * 2**20), int(args.upload_mib * 2**20))
            refused += was_refused
            held.append(sock)
        time.sleep(2.0)
        grown = rss_bytes(server.pgid) - before
        for sock in held:
            sock.close()
    print(
        f"{args.connections} uploads of {args.upload_mib:g} MiB stalled: server RSS +{grown / 2**20:.0f} MiB "
        f"(from {before / 2**20:.0f} MiB), {refused} refused before being read, {args.connections - refused} held; "
        f"{time.monotonic() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
