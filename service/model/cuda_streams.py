"""One CUDA stream per thread and device, so that work queued from different threads (decoding threads, forward
slots) never waits on each other's kernels, as it would on the device's legacy default stream."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_local = threading.local()


def thread_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's stream on ``device`` (a CUDA device), made on first use. Streams come from torch's pool (32 a
    device), so with many decoding threads two threads may share one: still correct, only less concurrent."""
    streams: dict[torch.device, torch.cuda.Stream] = _local.__dict__.setdefault("streams", {})
    stream = streams.get(device)
    if stream is None:
        stream = streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    return stream


@contextmanager
def on_thread_stream(device: torch.device) -> Iterator[torch.cuda.Stream | None]:
    """Make this thread's stream current on a CUDA ``device``; on any other device, nothing (yields ``None``)."""
    if device.type != "cuda":
        yield None
        return
    stream = thread_stream(device)
    with torch.cuda.stream(stream):
        yield stream
