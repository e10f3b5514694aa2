"""The gRPC server: ``grpc.aio`` on the HTTP server's event loop, bounded (message size, streams per connection,
calls at once), started and stopped by the app's lifespan."""

from __future__ import annotations

import logging

import grpc

from service.api.admission import AppState
from service.api.grpc.servicer import InferenceServicer

log = logging.getLogger("deit_serve.grpc")

# A connection without a call for this long is closed (GOAWAY; a client's channel reconnects on its next call), so
# that idle connections do not pile up: gRPC servers have no cap on their number.
IDLE_CONNECTION_S = 60


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc(state: AppState) -> grpc.aio.Server:
    """Listen on ``--grpc-port``; a port already in use fails start-up, as the HTTP port does."""
    settings = state.settings
    options = [
        ("grpc.max_receive_message_length", settings.max_upload_bytes),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        # The HTTP head's bound, for the call's metadata. max_metadata_size alone is a soft limit (metadata up to 1.25×
        # it is refused only at random); the absolute limit makes the bound firm.
        ("grpc.max_metadata_size", settings.max_header_bytes),
        ("grpc.absolute_max_metadata_size", settings.max_header_bytes),
        ("grpc.max_connection_idle_ms", IDLE_CONNECTION_S * 1000),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=settings.max_connections)
    server.add_generic_rpc_handlers((InferenceServicer(state).handler(),))
    address = _address(settings.host, settings.grpc_port)
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot listen for gRPC on {address}: {e} (set --grpc-port, or 0 to turn gRPC off)") from e
    await server.start()
    log.info("serving gRPC", extra={"address": address})
    return server
