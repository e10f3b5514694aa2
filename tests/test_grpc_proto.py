"""The committed gRPC code is what protoc makes of our .proto, and the service stands without the grpc extra."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest
from google.protobuf import descriptor_pb2

from harness.launcher import ServerProcess, free_port, launch, running, service_env
from service.api.grpc import inference_pb2

PROTO = Path(inference_pb2.__file__).with_name("inference.proto")


def test_committed_code_matches_the_proto(tmp_path: Path) -> None:
    out = tmp_path / "inference.desc"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}", f"--descriptor_set_out={out}", str(PROTO)],
        check=True,
    )
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _without_json_names(compiled.message_type)  # a descriptor set spells them out; generated code leaves them implied
    committed = descriptor_pb2.FileDescriptorProto.FromString(inference_pb2.DESCRIPTOR.serialized_pb)
    assert committed == compiled, "run scripts/gen_grpc after changing inference.proto"


def _without_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _without_json_names(message.nested_type)


def test_the_protocols_names_and_numbers() -> None:
    """A few of the published protocol's numbers a client depends on (a renumbered field would still compile)."""
    request = inference_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert (request["raw_input_contents"].number, request["outputs"].number, request["parameters"].number) == (7, 6, 4)
    assert inference_pb2.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number == 6
    assert inference_pb2.InferTensorContents.DESCRIPTOR.fields_by_name["bytes_contents"].number == 8
    assert inference_pb2.ModelConfig.DESCRIPTOR.fields_by_name["dynamic_batching"].number == 11
    assert inference_pb2.ModelConfig.DESCRIPTOR.fields_by_name["backend"].number == 17
    assert inference_pb2.ModelStatistics.DESCRIPTOR.fields_by_name["batch_stats"].number == 7
    assert inference_pb2.DESCRIPTOR.package == "inference"
    assert "GRPCInferenceService" in inference_pb2.DESCRIPTOR.services_by_name


def _launcher_env(tiny_store: Path, port: int, grpc_port: int) -> dict[str, str]:
    return service_env(port, tiny_store, {"DEIT_GRPC_PORT": str(grpc_port)})


def test_without_the_grpc_extra_the_service_serves_http_only(tiny_store: Path, tmp_path: Path) -> None:
    launcher = "import sys; sys.modules['grpc'] = None; from service.cli import main; main()"
    port = free_port()
    env = _launcher_env(tiny_store, port, free_port())
    with running([sys.executable, "-c", launcher], port=port, log_path=tmp_path / "server.log", env=env) as server:
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
        assert "gRPC is off: grpc is not installed" in server.log()
        server.terminate()
        assert server.wait(timeout=30) == 0


def test_a_grpc_port_in_use_fails_start_up_naming_it(
    tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)  # the service's own default, not a developer's
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        grpc_port = taken.getsockname()[1]
        port = free_port()
        argv = [sys.executable, "-m", "service"]
        server: ServerProcess = launch(
            argv, port=port, log_path=tmp_path / "server.log", env=_launcher_env(tiny_store, port, grpc_port)
        )
        try:
            assert server.wait(timeout=60) != 0
        finally:
            server.stop()
    assert f"cannot listen for gRPC on 127.0.0.1:{grpc_port}" in server.log()
    for line in server.log().splitlines():  # JSON lines only: gRPC's native core adds none of its own
        assert json.loads(line)["ts"], line
