"""The Open Inference Protocol over gRPC on a real server process, spoken by Triton's own client and by a client
generated from our .proto: the same answers as POST /classify, statistics, the model repository, API keys, bounds,
and the request's deadline, cancellation and queue limit carried over from the call (the drain over gRPC is in
test_hardening_drain, with the drain over HTTP: it ends its server)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from harness.launcher import free_port
from tests.profiles import grpc_address, grpc_bytes_input, slow_shared, start_grpc_call
from tests.serving import (
    ServerProcess,
    SharedServers,
    classify_probabilities,
    noise_image_bytes,
    preprocessed_pixels,
    scrape,
    wait_until,
)

KEY = "grpc-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_FILES = 4
MAX_UPLOAD = 512 * 1024
NUM_LABELS = 10
PROTO = Path(__file__).resolve().parent.parent / "service" / "api" / "grpc" / "inference.proto"


def jpeg(seed: int, size: tuple[int, int] = (44, 38)) -> bytes:
    return noise_image_bytes(seed, size, "JPEG")


IMAGES = [jpeg(seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def server(tiny_store: Path, servers: SharedServers) -> ServerProcess:
    """A shared server with gRPC on (its port chosen once, here); the tests below leave its store as it was."""
    env = {
        "DEIT_DEVICE": "cpu", "DEIT_DTYPE": "float32", "DEIT_MAX_FILES": str(MAX_FILES), "DEIT_API_KEYS": KEY,
        "DEIT_GRPC_PORT": str(free_port()), "DEIT_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
    }  # fmt: skip
    return servers.get(tiny_store, env)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(grpc_address(server))
    yield c
    c.close()


def _post(server: ServerProcess, path: str, top_k: int = NUM_LABELS) -> dict[str, Any]:
    files = [("file", (f"img{i}.jpg", data, "image/jpeg")) for i, data in enumerate(IMAGES)]
    r = httpx.post(f"{server.url}{path}", params={"top_k": top_k}, files=files, headers={"X-API-Key": KEY}, timeout=30)
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


@pytest.fixture(scope="module")
def classify_probs(server: ServerProcess) -> np.ndarray:
    probs: np.ndarray = classify_probabilities(server.url, IMAGES, NUM_LABELS, {"X-API-Key": KEY})
    return probs


@pytest.fixture(scope="module")
def pixels(tiny_store: Path) -> np.ndarray:
    pixels: np.ndarray = preprocessed_pixels(tiny_store / "tiny", IMAGES)
    return pixels


def grpc_error(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


# --- tritonclient.grpc ---------------------------------------------------------------------------------------------


def test_health_metadata_and_config(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny", headers=AUTH)
    assert client.is_model_ready("tiny", "1", headers=AUTH)
    assert "statistics" in client.get_server_metadata(as_json=True)["extensions"]
    meta = client.get_model_metadata("tiny", headers=AUTH, as_json=True)
    assert (meta["name"], meta["versions"], meta["platform"]) == ("tiny", ["1"], "pytorch_deit")
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]}
    assert inputs == {"image": ("BYTES", ["-1", "1"]), "pixel_values": ("FP32", ["-1", "3", "32", "32"])}
    config = client.get_model_config("tiny", headers=AUTH).config
    assert config.max_batch_size == 32
    assert {i.name: list(i.dims) for i in config.input} == {"image": [1], "pixel_values": [3, 32, 32]}
    assert {o.name: list(o.dims) for o in config.output} == {"probabilities": [10], "logits": [10], "embedding": [32]}
    assert config.HasField("dynamic_batching")
    missing = grpc_error(lambda: client.get_model_metadata("nope", headers=AUTH))
    assert missing.status() == "StatusCode.NOT_FOUND"
    assert "nope" in (missing.message() or "")


def test_binary_bytes_with_classification_and_embedding_equal_classify_and_embed(
    client: triton.InferenceServerClient, server: ServerProcess, classify_probs: np.ndarray
) -> None:
    outputs = [
        triton.InferRequestedOutput("probabilities"),
        triton.InferRequestedOutput("logits", class_count=3),
        triton.InferRequestedOutput("embedding"),
    ]
    result = client.infer("tiny", [grpc_bytes_input(IMAGES)], outputs=outputs, request_id="req-7", headers=AUTH)
    assert result.get_response().id == "req-7"
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, classify_probs, atol=1e-5)
    top = result.as_numpy("logits")
    assert top.shape == (3, 3)
    for row, entries in enumerate(top):
        indices = [int(e.decode().split(":")[1]) for e in entries]
        assert indices == list(np.argsort(-classify_probs[row])[:3])
    embedded = [r["embedding"] for r in _post(server, "/embed")["results"]]
    np.testing.assert_allclose(result.as_numpy("embedding"), np.array(embedded, dtype=np.float32), atol=1e-5)


def test_statistics_over_grpc_and_rest_count_the_same_calls(
    client: triton.InferenceServerClient, server: ServerProcess
) -> None:
    before = client.get_inference_statistics("tiny", headers=AUTH, as_json=True)["model_stats"][0]
    for _ in range(2):
        client.infer("tiny", [grpc_bytes_input(IMAGES[:2])], headers=AUTH)
    grpc_stats = client.get_inference_statistics("tiny", headers=AUTH, as_json=True)["model_stats"][0]
    rest = httpx.get(f"{server.url}/v2/models/tiny/versions/1/stats", headers={"X-API-Key": KEY}, timeout=10).json()
    (rest_stats,) = rest["model_stats"]
    assert (rest_stats["name"], rest_stats["version"]) == ("tiny", "1")
    assert (
        int(grpc_stats["inference_count"]) == int(before.get("inference_count", 0)) + 4 == rest_stats["inference_count"]
    )
    assert (
        int(grpc_stats["execution_count"]) == rest_stats["execution_count"] >= int(before.get("execution_count", 0)) + 1
    )
    success = rest_stats["inference_stats"]["success"]
    assert success["count"] == int(grpc_stats["inference_stats"]["success"]["count"])
    assert success["count"] >= int(before["inference_stats"].get("success", {}).get("count", 0)) + 2
    assert rest_stats["inference_stats"]["queue"]["count"] == rest_stats["inference_count"]
    assert rest_stats["inference_stats"]["compute_input"]["count"] >= 4  # images decoded
    executions = sum(b["compute_infer"]["count"] for b in rest_stats["batch_stats"])
    assert executions == rest_stats["execution_count"]
    assert all(1 <= b["batch_size"] <= 32 for b in rest_stats["batch_stats"])
    assert rest_stats["last_inference"] >= int(before.get("last_inference", 0))
    # The same counters as /metrics.
    metrics = scrape(server)
    assert metrics.value("deit_images_total", model="tiny", version="1") == rest_stats["inference_count"]
    assert metrics.value("deit_batch_executions_total", model="tiny", version="1") == rest_stats["execution_count"]
    every = httpx.get(f"{server.url}/v2/models/stats", headers={"X-API-Key": KEY}, timeout=10).json()
    assert [(s["name"], s["version"]) for s in every["model_stats"]] == [("tiny", "1")]
    assert httpx.get(f"{server.url}/v2/models/nope/stats", headers={"X-API-Key": KEY}, timeout=10).status_code == 404
    assert httpx.get(f"{server.url}/v2/models/stats", timeout=10).status_code == 401


def test_repository_unload_and_load(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index(headers=AUTH, as_json=True)["models"]
    assert {"name": "tiny", "version": "1", "state": "READY"}.items() <= index[0].items()
    client.unload_model("tiny", headers=AUTH)
    try:
        assert grpc_error(lambda: client.is_model_ready("tiny", headers=AUTH)).status() == "StatusCode.NOT_FOUND"
        gone = grpc_error(lambda: client.infer("tiny", [grpc_bytes_input(IMAGES[:1])], headers=AUTH))
        assert gone.status() == "StatusCode.NOT_FOUND"
    finally:
        client.load_model("tiny", headers=AUTH)
    assert client.is_model_ready("tiny", headers=AUTH)
    assert client.infer("tiny", [grpc_bytes_input(IMAGES[:1])], headers=AUTH).as_numpy("probabilities").shape == (1, 10)


def test_refused_repository_names_never_label_the_metrics(
    client: triton.InferenceServerClient, server: ServerProcess
) -> None:
    """A client can send any model name to load or unload: a refused one is counted, but never becomes a label
    value (each would be a new series, kept for the life of the process)."""
    names = [f"no-such-model-{i}" for i in range(8)]
    load = "/inference.GRPCInferenceService/RepositoryModelLoad"
    unload = "/inference.GRPCInferenceService/RepositoryModelUnload"
    before = scrape(server)
    for name in names:
        assert grpc_error(lambda n=name: client.load_model(n, headers=AUTH)).status() == "StatusCode.NOT_FOUND"
        assert grpc_error(lambda n=name: client.unload_model(n, headers=AUTH)).status() == "StatusCode.NOT_FOUND"
    metrics = scrape(server)
    for endpoint in (load, unload):
        counted = metrics.value("deit_requests_total", protocol="grpc", endpoint=endpoint, status="404")
        assert counted - before.value("deit_requests_total", protocol="grpc", endpoint=endpoint, status="404") == 8
    labelled = {labels.get("model") for samples in metrics.families.values() for _, labels, _ in samples}
    assert not labelled & set(names)


def test_api_keys_from_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()  # health and server metadata are open, as their REST routes
    for headers in (None, {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
        error = grpc_error(lambda h=headers: client.infer("tiny", [grpc_bytes_input(IMAGES[:1])], headers=h))
        assert error.status() == "StatusCode.UNAUTHENTICATED", headers
        assert "API key" in (error.message() or "")
    ok = client.infer("tiny", [grpc_bytes_input(IMAGES[:1])], headers={"x-api-key": KEY})
    assert ok.as_numpy("probabilities").shape == (1, NUM_LABELS)


def test_bad_input_and_bounds_are_clear_errors(client: triton.InferenceServerClient, server: ServerProcess) -> None:
    wrong = triton.InferInput("image", [1, 1], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 1), dtype=np.float32))
    error = grpc_error(lambda: client.infer("tiny", [wrong], headers=AUTH))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "must be BYTES" in (error.message() or "")
    broken = grpc_error(lambda: client.infer("tiny", [grpc_bytes_input([b"not an image"])], headers=AUTH))
    assert broken.status() == "StatusCode.INVALID_ARGUMENT"
    too_many = grpc_error(lambda: client.infer("tiny", [grpc_bytes_input(IMAGES * 2)], headers=AUTH))
    assert too_many.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert f"at most {MAX_FILES}" in (too_many.message() or "")
    too_large = grpc_error(lambda: client.infer("tiny", [grpc_bytes_input([b"\xff" * (MAX_UPLOAD + 1)])], headers=AUTH))
    assert too_large.status() == "StatusCode.RESOURCE_EXHAUSTED"  # refused by gRPC before it reaches us
    big_metadata = {**AUTH, "x-padding": "a" * 70_000}  # over --max-header-bytes (64 KiB)
    refused = grpc_error(lambda: client.infer("tiny", [grpc_bytes_input(IMAGES[:1])], headers=big_metadata))
    assert refused.status() == "StatusCode.RESOURCE_EXHAUSTED", refused
    assert client.is_server_live()


def test_metrics_and_access_log_name_the_grpc_front_door(
    client: triton.InferenceServerClient, server: ServerProcess
) -> None:
    client.infer("tiny", [grpc_bytes_input(IMAGES[:1])], headers={**AUTH, "x-request-id": "grpc-log-1"})
    unknown = grpc_error(lambda: client.infer("nope", [grpc_bytes_input(IMAGES[:1])], headers=AUTH))
    assert unknown.status() == "StatusCode.NOT_FOUND"
    endpoint = "/inference.GRPCInferenceService/ModelInfer"
    metrics = scrape(server)
    assert metrics.value("deit_requests_total", protocol="grpc", endpoint=endpoint, status="200", model="tiny") >= 1
    assert metrics.value("deit_requests_total", protocol="grpc", endpoint=endpoint, status="401") >= 1
    # The series dashboards and autoscaling count: every front door's inference requests, gRPC among them.
    inference = "deit_inference_request_duration_seconds_count"
    assert metrics.value(inference, protocol="grpc", model="tiny", status="200") >= 1
    _post(server, "/embed")
    after = scrape(server)
    assert after.value(inference, protocol="native", model="tiny", status="200") >= 1
    assert not after.has_sample(inference, protocol="grpc", status="401")  # refused before naming a model to run
    assert not after.has_sample(inference, protocol="grpc", status="404")  # refused before admission, as over REST

    def logged() -> bool:
        return any(r.get("request_id") == "grpc-log-1" for r in server.log_records())

    wait_until(logged, what="the call's access-log line")
    (line,) = [r for r in server.log_records() if r.get("request_id") == "grpc-log-1"]
    assert (line["protocol"], line["path"], line["status"], line["model"], line["images"]) == (
        "grpc",
        endpoint,
        200,
        "tiny",
        1,
    )


# --- a client generated from our .proto ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    """``inference_pb2`` and ``inference_pb2_grpc`` made by protoc from the .proto. Its messages go in a pool of
    their own (as ours do): tritonclient's, with the same names, are in the default pool of this process."""
    out = tmp_path_factory.mktemp("generated")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}", f"--python_out={out}",
         f"--grpc_python_out={out}", str(PROTO)],
        check=True,
    )  # fmt: skip
    messages = out / "inference_pb2.py"
    code = messages.read_text().replace("_descriptor_pool.Default()", "_descriptor_pool.DescriptorPool()")
    messages.write_text(code.replace("'inference_pb2'", "'generated_inference_pb2'"))
    (out / "inference_pb2.py").rename(out / "generated_inference_pb2.py")
    stubs = (
        (out / "inference_pb2_grpc.py")
        .read_text()
        .replace("import inference_pb2 as", "import generated_inference_pb2 as")
    )
    (out / "generated_inference_pb2_grpc.py").write_text(stubs)
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("generated_inference_pb2"), importlib.import_module(
            "generated_inference_pb2_grpc"
        )
    finally:
        sys.path.remove(str(out))


def test_generated_client_bytes_contents_and_pixels(
    server: ServerProcess, generated: tuple[ModuleType, ModuleType], classify_probs: np.ndarray, pixels: np.ndarray
) -> None:
    pb, stubs = generated
    with grpc.insecure_channel(grpc_address(server)) as channel:
        stub = stubs.GRPCInferenceServiceStub(channel)
        meta = (("authorization", f"Bearer {KEY}"),)
        request = pb.ModelInferRequest(
            model_name="tiny", outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")]
        )
        request.inputs.add(name="image", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(IMAGES)
        answer = stub.ModelInfer(request, metadata=meta, timeout=30)
        assert (answer.model_name, answer.model_version, list(answer.outputs[0].shape)) == ("tiny", "1", [3, 10])
        probs = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(3, 10)
        np.testing.assert_allclose(probs, classify_probs, atol=1e-5)

        by_pixels = pb.ModelInferRequest(model_name="tiny", model_version="1")
        tensor = by_pixels.inputs.add(name="pixel_values", datatype="FP32", shape=list(pixels.shape))
        tensor.contents.fp32_contents.extend(pixels.ravel().tolist())
        answer = stub.ModelInfer(by_pixels, metadata=meta, timeout=30)
        outputs = {o.name: i for i, o in enumerate(answer.outputs)}
        probs = np.frombuffer(answer.raw_output_contents[outputs["probabilities"]], dtype="<f4").reshape(3, 10)
        np.testing.assert_allclose(probs, classify_probs, atol=1e-5)

        half = pb.ModelInferRequest(model_name="tiny", raw_input_contents=[pixels.astype("<f2").tobytes()])
        half.inputs.add(name="pixel_values", datatype="FP16", shape=list(pixels.shape))
        answer = stub.ModelInfer(half, metadata=meta, timeout=30)
        outputs = {o.name: i for i, o in enumerate(answer.outputs)}
        probs = np.frombuffer(answer.raw_output_contents[outputs["probabilities"]], dtype="<f4").reshape(3, 10)
        np.testing.assert_allclose(probs, classify_probs, atol=1e-3)

        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny"), metadata=meta, timeout=30)
        assert stats.model_stats[0].inference_count >= 9


# --- deadline, cancellation and queue limit on a busy model -------------------------------------------------------


@pytest.fixture
def slow(slow_store: Path, servers: SharedServers) -> Iterator[ServerProcess]:
    """The shared slow model (``slow_shared``): a call of 128 images keeps it busy for seconds. Each test leaves its
    queue empty, for the next test on this server."""
    server = servers.get(slow_store, slow_shared())
    yield server
    wait_until(lambda: queued(server) == 0, timeout=30, what="an empty queue")


SLOW_IMAGES = [jpeg(seed, (96, 96)) for seed in range(128)]


def wait_for_metric(server: ServerProcess, sample: str, at_least: float, **labels: str) -> None:
    wait_until(lambda: scrape(server).value(sample, model="slow", **labels) >= at_least, timeout=30, what=sample)


def queued(server: ServerProcess) -> float:
    return scrape(server).value("deit_queue_depth", model="slow")


def test_deadline_of_the_call_is_the_requests(slow: ServerProcess) -> None:
    with triton.InferenceServerClient(grpc_address(slow)) as client:
        dropped = scrape(slow).value("deit_dropped_total", model="slow")
        # Triton's own timeout parameter (microseconds): the server answers DEADLINE_EXCEEDED itself.
        error = grpc_error(lambda: client.infer("slow", [grpc_bytes_input(SLOW_IMAGES)], timeout=200_000))
        assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert "deadline" in (error.message() or "")
        wait_for_metric(slow, "deit_dropped_total", dropped + 1)
        # The gRPC deadline: the images not yet run are withdrawn when it passes, on either side.
        dropped = scrape(slow).value("deit_dropped_total", model="slow")
        error = grpc_error(lambda: client.infer("slow", [grpc_bytes_input(SLOW_IMAGES)], client_timeout=0.2))
        assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
        wait_for_metric(slow, "deit_dropped_total", dropped + 1)
        wait_until(lambda: queued(slow) == 0, timeout=30, what="empty queue")


def test_cancelled_call_withdraws_its_images(slow: ServerProcess) -> None:
    with triton.InferenceServerClient(grpc_address(slow)) as client:
        dropped = scrape(slow).value("deit_dropped_total", model="slow", reason="disconnect")
        cancelled = scrape(slow).value("deit_requests_total", protocol="grpc", status="499")
        call = start_grpc_call(client, "slow", SLOW_IMAGES)
        wait_for_metric(slow, "deit_queue_depth", 1)
        call.call.cancel()  # type: ignore[attr-defined]
        with pytest.raises(InferenceServerException) as caught:
            call.result(timeout=30)
        assert "CANCELLED" in str(caught.value.status())
        wait_for_metric(slow, "deit_dropped_total", dropped + 1, reason="disconnect")
        wait_until(
            lambda: scrape(slow).value("deit_requests_total", protocol="grpc", status="499") >= cancelled + 1,
            timeout=30, what="the cancelled call in the metrics",
        )  # fmt: skip


def test_full_queue_is_resource_exhausted(slow: ServerProcess) -> None:
    with triton.InferenceServerClient(grpc_address(slow)) as client:
        call = start_grpc_call(client, "slow", SLOW_IMAGES)
        wait_for_metric(slow, "deit_queue_depth", 1)
        # Room for 128 images, while the first call's are not all done: another 128 do not fit.
        error = grpc_error(lambda: client.infer("slow", [grpc_bytes_input(SLOW_IMAGES)]))
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "at capacity" in (error.message() or "")
        call.call.cancel()  # type: ignore[attr-defined]
        with pytest.raises(InferenceServerException):
            call.result(timeout=30)


def test_a_load_by_hub_id_is_refused_unless_the_operator_allows_it(
    server: ServerProcess, generated: tuple[ModuleType, ModuleType]
) -> None:
    """The load's ``hub_id`` parameter is the REST load's: off without ``--allow-hub-ids``, refused before anything
    is fetched, as PERMISSION_DENIED."""
    pb, stubs = generated
    with grpc.insecure_channel(grpc_address(server)) as channel:
        stub = stubs.GRPCInferenceServiceStub(channel)
        request = pb.RepositoryModelLoadRequest(model_name="other")
        request.parameters["hub_id"].string_param = "acme/deit"
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelLoad(request, metadata=(("x-api-key", KEY),), timeout=30)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "--allow-hub-ids" in (caught.value.details() or "")
