"""The same load through each front door of one server: POST /classify, Open Inference Protocol binary infer over
REST and over gRPC, and the Hugging Face route; img/s, p50/p99, and each protocol's img/s over /classify's in the
same round.

One server process, one model; rounds interleave the four (the order turns each round), each a closed loop of
``--concurrency`` clients (one connection each) sending one 640×480 JPEG per request. Every door answers the top 5
classes: /classify its predictions, V2 (REST and gRPC) the classification extension's strings, Hugging Face its
``[{label, score}]``.

    python -m benchmarks.protocols --model tiny --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import struct
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from benchmarks import assets
from benchmarks.loadgen import (
    Body,
    Connect,
    LoadResult,
    Send,
    ServerSpec,
    multipart,
    python_module,
    run_closed_loop,
    running,
)

PROTOCOLS = ("classify", "v2", "grpc", "hf")
TITLES = {"classify": "POST /classify", "v2": "V2 binary infer", "grpc": "V2 gRPC infer", "hf": "Hugging Face"}
TOP_K = 5


def v2_binary_body(image: bytes) -> Body:
    """One image as binary tensor data: the JSON header, then the BYTES element (4-byte length, then the bytes)."""
    element = struct.pack("<I", len(image)) + image
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": len(element)}}
    header = {
        "inputs": [tensor],
        "outputs": [{"name": "probabilities", "parameters": {"classification": TOP_K, "binary_data": False}}],
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return Body(encoded + element, "application/octet-stream", {"Inference-Header-Content-Length": str(len(encoded))})


def grpc_requests(photos: Sequence[bytes], model: str) -> list[bytes]:
    """ModelInferRequest messages, serialized once: each image a BYTES element in raw_input_contents (as
    tritonclient.grpc sends it), the top 5 classes asked for."""
    from service.api.grpc import inference_pb2 as pb

    messages = []
    for photo in photos:
        request = pb.ModelInferRequest(model_name=model, raw_input_contents=[struct.pack("<I", len(photo)) + photo])
        request.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
        request.outputs.add(name="probabilities").parameters["classification"].int64_param = TOP_K
        messages.append(request.SerializeToString())
    return messages


def grpc_connect(address: str, requests: Sequence[bytes], timeout_s: float = 120) -> Connect:
    """A client's own gRPC channel (one HTTP/2 connection), sending the serialized requests in turn."""
    import grpc

    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[Send]:
        async with grpc.aio.insecure_channel(address) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out

            async def send(index: int) -> str:
                try:
                    await infer(requests[index % len(requests)], timeout=timeout_s)
                except grpc.aio.AioRpcError as e:
                    return f"gRPC {e.code().name}"
                return ""

            yield send

    return connect


def bodies_and_paths(photos: Sequence[bytes], model: str) -> dict[str, tuple[str, list[Body]]]:
    return {
        "classify": (f"/classify?top_k={TOP_K}", [multipart(p, f"photo{i}.jpg") for i, p in enumerate(photos)]),
        "v2": (f"/v2/models/{model}/infer", [v2_binary_body(p) for p in photos]),
        "grpc": ("", []),  # over its own port: grpc_connect
        "hf": (f"/models/{model}", [Body(p, "image/jpeg") for p in photos]),
    }


def per_cpu_second(result: LoadResult) -> float:
    """Images per CPU-second the server used: on a shared machine, what other tenants take does not move it."""
    if result.cpu is None or result.cpu.server <= 0:
        return float("nan")
    return result.img_s / (result.cpu.server * (os.cpu_count() or 1))


def ratio_to_classify(rounds: dict[str, list[LoadResult]], protocol: str, per_cpu: bool = False) -> float | None:
    """Median over rounds of the protocol's img/s (or images per server CPU-second) over /classify's in the same
    round."""
    measure = per_cpu_second if per_cpu else (lambda r: r.img_s)
    pairs = zip(rounds[protocol], rounds["classify"], strict=True)
    ratios = [measure(a) / measure(b) for a, b in pairs if measure(b) > 0]
    return statistics.median(ratios) if ratios else None


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rounds: dict[str, list[LoadResult]], model: str, concurrency: int) -> str:
    lines = [
        "| front door | model | c | img/s | p50 ms | p99 ms | img/s ÷ /classify | img per server CPU-s "
        "| ÷ /classify | server CPU | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for protocol in PROTOCOLS:
        results = rounds[protocol]
        img_s = statistics.median(r.img_s for r in results)
        p50 = statistics.median(r.p50_ms for r in results)
        p99 = statistics.median(r.p99_ms for r in results)
        per_cpu = statistics.median(per_cpu_second(r) for r in results)
        server_cpu = statistics.median(r.cpu.server for r in results if r.cpu is not None)
        errors = sum(sum(r.errors.values()) for r in results)
        lines.append(
            f"| {TITLES[protocol]} | {model} | {concurrency} | {img_s:.1f} | {p50:.0f} | {p99:.0f} | "
            f"{_ratio(ratio_to_classify(rounds, protocol))} | {per_cpu:.1f} | "
            f"{_ratio(ratio_to_classify(rounds, protocol, per_cpu=True))} | {server_cpu:.0%} | {errors} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", choices=sorted(assets.VARIANTS), default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--image-size", choices=sorted(assets.IMAGE_SIZES), default="640x480")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds of load before each measured window")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of each measured window")
    parser.add_argument("--rounds", type=int, default=3, help="measured windows per front door")
    args = parser.parse_args(argv)

    model_dir = assets.checkpoint(args.model)
    photos = assets.photos(args.image_size)
    doors = bodies_and_paths(photos, model_dir.name)
    env = {"DEIT_MODEL_STORE": str(model_dir.parent), "DEIT_DTYPE": args.dtype, "DEIT_HOST": "127.0.0.1",
           "DEIT_PORT": "{port}", "DEIT_GRPC_PORT": "{grpc_port}", "DEIT_ACCESS_LOG": "false"}  # fmt: skip
    spec = ServerSpec("ours", python_module("service"), "/readyz", "", env)
    rounds: dict[str, list[LoadResult]] = {p: [] for p in PROTOCOLS}
    log_path = Path(tempfile.gettempdir()) / f"deit-protocols-{args.model}.log"
    with running(spec, log_path) as server:
        connects = {"grpc": grpc_connect(f"127.0.0.1:{server.grpc_port}", grpc_requests(photos, model_dir.name))}
        for protocol in PROTOCOLS:  # first requests pay for lazy initialisation: not measured
            path, bodies = doors[protocol]
            connect = connects.get(protocol)
            run_closed_loop(server.url + path, bodies, concurrency=4, warmup_s=0, duration_s=1.0, connect=connect)
        for r in range(args.rounds):
            turn = r % len(PROTOCOLS)
            order = PROTOCOLS[turn:] + PROTOCOLS[:turn]
            for protocol in order:
                path, bodies = doors[protocol]
                result = run_closed_loop(
                    server.url + path,
                    bodies,
                    concurrency=args.concurrency,
                    warmup_s=args.warmup,
                    duration_s=args.duration,
                    server_pgid=server.pgid,
                    connect=connects.get(protocol),
                )
                rounds[protocol].append(result)
                cpu = result.cpu
                shares = f"  CPU server {cpu.server:.0%} client {cpu.client:.0%} other {cpu.other:.0%}" if cpu else ""
                errors = f"  errors {result.errors}" if result.errors else ""
                print(
                    f"  {r + 1} {TITLES[protocol]:<16} c={args.concurrency} {result.img_s:7.1f} img/s  "
                    f"p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms{shares}{errors}",
                    flush=True,
                )
    print()
    print("medians over rounds; ratios: median of the same round's ratios; server CPU: share of the machine")
    print(table(rounds, args.model, args.concurrency))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
