"""CUDA graphs for the forward pass: one graph per bucketed batch size, a batch padded to its bucket.

A graph replays a fixed sequence of kernels on fixed buffers, so a batch is copied into its bucket's input buffer
(the rows past the batch zeroed) and its rows of the output are copied out. DeiT's rows are independent, so the
padding never changes a real row's result. The bucketing and padding are pure functions, tested on any machine.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from service.model.deit import DeiT
from service.model.pooling import LOGITS, serving_outputs


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch_size``, and ``max_batch_size`` itself: at most 2× padding per batch."""
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def bucket_for(batch: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``batch`` images."""
    for size in buckets:
        if size >= batch >= 1:
            return size
    raise ValueError(f"batch of {batch} fits no bucket of {tuple(buckets)}")


def fill_bucket(buffer: Tensor, batch: Tensor) -> Tensor:
    """Copy ``batch`` into the first rows of ``buffer`` and zero the rest; returns ``buffer``."""
    n = batch.shape[0]
    if n > buffer.shape[0] or batch.shape[1:] != buffer.shape[1:]:
        raise ValueError(f"batch of shape {tuple(batch.shape)} does not fit a buffer of {tuple(buffer.shape)}")
    buffer[:n].copy_(batch)
    buffer[n:].zero_()
    return buffer


class GraphedModel(nn.Module):
    """``model`` replayed from CUDA graphs captured at load time for each bucket of ``image_shape`` inputs.

    Other input shapes run eagerly. One replay at a time (a lock, and each replay's stream waits for the last one's
    end): the graphs share their buffers and memory pool, and forward slots replay from streams of their own.
    """

    def __init__(self, model: DeiT, buckets: Sequence[int], image_shape: tuple[int, int, int],
                 dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        super().__init__()
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model = model
        self.buckets = tuple(sorted(buckets))
        self.image_shape = image_shape
        self._lock = threading.Lock()
        self._replayed: torch.cuda.Event | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, dict[str, Tensor]]] = {}
        pool = None
        with torch.inference_mode():
            for size in sorted(self.buckets, reverse=True):  # the largest first: the others reuse its memory
                static_in = torch.zeros((size, *image_shape), dtype=dtype, device=device)
                side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(2):  # kernel selection and allocator warm-up happen outside the capture
                        serving_outputs(model, static_in)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    static_out = serving_outputs(model, static_in)  # every output serving reads
                pool = graph.pool()
                self._graphs[size] = (graph, static_in, static_out)
        torch.cuda.synchronize(device)

    def outputs(self, pixel_values: Tensor) -> dict[str, Tensor]:
        """``serving_outputs`` of the batch: replayed from the graph of its bucket (padded), or eagerly."""
        n = pixel_values.shape[0]
        if tuple(pixel_values.shape[1:]) != self.image_shape or n > self.buckets[-1]:
            return serving_outputs(self.model, pixel_values)
        with self._lock:
            stream = torch.cuda.current_stream(pixel_values.device)
            if self._replayed is not None:  # the last replay, maybe from another thread's stream, has read and
                stream.wait_event(self._replayed)  # written the shared buffers before these are filled again
            graph, static_in, static_out = self._graphs[bucket_for(n, self.buckets)]
            fill_bucket(static_in, pixel_values)
            graph.replay()
            outputs = {name: value[:n].clone() for name, value in static_out.items()}
            self._replayed = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._replayed.record(stream)
            return outputs

    def forward(self, pixel_values: Tensor) -> Tensor:
        if LOGITS in next(iter(self._graphs.values()))[2]:
            return self.outputs(pixel_values)[LOGITS]
        logits: Tensor = self.model(pixel_values)
        return logits
