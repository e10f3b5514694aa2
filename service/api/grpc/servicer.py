"""``inference.GRPCInferenceService``: a thin transport over the calls the REST V2 routes make (resolve the model,
admit, parse with the V2 codec, run on the engine, encode), with errors mapped in ``status.py``.

Each call is counted in the request metrics (``protocol="grpc"``, the HTTP status its error has, 200 when OK) and
logged in the access log like an HTTP request. The call's deadline is the request's deadline, and a call the client
cancels cancels the request: its images not yet decoded or batched never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from service import __version__
from service.api.admission import AppState, admission
from service.api.grpc import inference_pb2 as pb
from service.api.grpc.codec import build_response, parse_request
from service.api.grpc.status import HTTP_STATUS, status_of
from service.api.statistics import model_statistics
from service.api.v2 import EXTENSIONS, config_of, loaded_versions, metadata_of, output_widths, resolve_model
from service.api.v2_codec import embedding_output, output_tensors
from service.engine.context import RequestContext
from service.engine.lifecycle import Phase
from service.engine.repository import scan_store
from service.engine.served import RequestStats, ServedModel
from service.errors import ClientGone, ServiceError
from service.http.access_log import RequestRecord, record_request
from service.http.auth import check_key, key_of
from service.images import EncodedImage
from service.tracing import RequestTrace

log = logging.getLogger("deit_serve.grpc")

SERVICE = "inference.GRPCInferenceService"
OPEN_METHODS = frozenset({"ServerLive", "ServerReady", "ServerMetadata"})  # no API key, as their REST routes
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass
class Call:
    """One RPC's bookkeeping for its metrics and log line."""

    method: str
    metadata: dict[str, str]
    arrival: float  # time.monotonic(): the origin of its deadline
    started: float  # time.perf_counter()
    model: str = ""
    version: str = ""
    stats: RequestStats | None = None
    trace: RequestTrace | None = None
    inference: bool = False

    @property
    def request_id(self) -> str:
        incoming = self.metadata.get("x-request-id", "")
        return incoming if _VALID_ID.match(incoming) else uuid.uuid4().hex


Method = Callable[[Any, grpc.aio.ServicerContext, Call], Awaitable[Message]]


class InferenceServicer:
    def __init__(self, state: AppState) -> None:
        self.state = state

    # --- health and metadata ------------------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any, call: Call) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any, call: Call) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.lifecycle.phase is Phase.READY)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any, call: Call) -> pb.ModelReadyResponse:
        if self.state.lifecycle.phase is not Phase.READY:  # loading or draining: no model takes work
            return pb.ModelReadyResponse(ready=False)
        self._model(request.name, request.version, call)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any, call: Call
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="deit-serve", version=__version__, extensions=list(EXTENSIONS))

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any, call: Call
    ) -> pb.ModelMetadataResponse:
        served = self._model(request.name, request.version, call)
        metadata = metadata_of(served, loaded_versions(self.state, served)).model_dump(exclude_none=True)
        return json_format.ParseDict(metadata, pb.ModelMetadataResponse(), ignore_unknown_fields=True)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any, call: Call) -> pb.ModelConfigResponse:
        served = self._model(request.name, request.version, call)
        config = config_of(served, self.state.settings.max_batch_size, loaded_versions(self.state, served))
        message = json_format.ParseDict(
            config.model_dump(exclude_none=True), pb.ModelConfig(), ignore_unknown_fields=True
        )
        return pb.ModelConfigResponse(config=message)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any, call: Call
    ) -> pb.ModelStatisticsResponse:
        stats = model_statistics(self.state, request.name or None, request.version or None)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    # --- model repository ---------------------------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any, call: Call
    ) -> pb.RepositoryIndexResponse:
        contents = await asyncio.to_thread(scan_store, self.state.settings.model_store)
        rows = self.state.store.index(contents, request.ready)
        return json_format.ParseDict({"models": rows}, pb.RepositoryIndexResponse(), ignore_unknown_fields=True)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any, call: Call
    ) -> pb.RepositoryModelLoadResponse:
        self.state.lifecycle.check_accepting()
        call.model = request.model_name
        await self.state.store.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any, call: Call
    ) -> pb.RepositoryModelUnloadResponse:
        self.state.lifecycle.check_accepting()
        call.model = request.model_name
        await self.state.store.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- inference ----------------------------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any, call: Call) -> pb.ModelInferResponse:
        state = self.state
        call.inference = True
        state.lifecycle.check_accepting()  # 503 while loading or draining comes before a 404 for a model not loaded
        served = self._model(request.model_name, request.model_version, call)
        remaining = context.time_remaining()  # the call's deadline; None: the server's default
        timeout = None if remaining is None else max(remaining, 1e-6)
        with admission(state, served, call.arrival, timeout, call.trace) as (
            request_context,
            reservation,
        ):
            call.stats = RequestStats()
            reservation.grow(request.ByteSize())  # the message is held until the answer
            context.add_done_callback(lambda _: request_context.cancel(ClientGone("the client cancelled the call")))
            work = asyncio.ensure_future(self._infer(request, served, request_context, call))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:  # the call ended first: stop the request, then let its images go
                request_context.cancel(ClientGone("the client cancelled the call"))
                with contextlib.suppress(Exception):
                    await work
                raise

    async def _infer(
        self, request: pb.ModelInferRequest, served: ServedModel, context: RequestContext, call: Call
    ) -> pb.ModelInferResponse:
        settings = self.state.settings
        parsed = await self.state.decode_pool.run(
            context,
            lambda: parse_request(
                request, input_size=served.input_size, max_elements=settings.max_files,
                offered=list(output_widths(served)),
            ),
        )  # fmt: skip
        if parsed.timeout_s is not None:
            context.shorten(call.arrival + parsed.timeout_s)
        embedding = embedding_output(parsed.outputs)
        pooling = served.pooling(embedding.pooling if embedding is not None else None)
        if parsed.images is not None:
            inputs: Any = [EncodedImage(f"image {i}", data) for i, data in enumerate(parsed.images)]
        else:
            inputs = parsed.pixels
        outputs = await served.outputs(inputs, context, call.stats)
        tensors = output_tensors(outputs, parsed.outputs, pooling)
        return build_response(served.name, str(served.version), parsed.id, parsed.outputs, tensors, served.labels)

    def _model(self, name: str, version: str, call: Call) -> ServedModel:
        served = resolve_model(self.state, name, version or None)
        call.model, call.version = served.name, str(served.version)
        return served

    # --- the transport ------------------------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's methods, each wrapped in ``_call`` (auth, error mapping, metrics, access log)."""
        methods: dict[str, Any] = {}
        service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        for method in service.methods:
            request_type = getattr(pb, method.input_type.name)
            response_type = getattr(pb, method.output_type.name)
            methods[method.name] = grpc.unary_unary_rpc_method_handler(
                self._call(method.name, getattr(self, method.name)),
                request_deserializer=request_type.FromString,
                response_serializer=response_type.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _call(self, name: str, method: Method) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]:
        state = self.state

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Message:
            metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
            call = Call(name, metadata, time.monotonic(), time.perf_counter())
            if state.tracing is not None:
                attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": name}
                call.trace = state.tracing.start_request(f"{SERVICE}/{name}", metadata, attributes)
            try:
                if name not in OPEN_METHODS:
                    check_key(key_of(metadata.get("authorization"), metadata.get("x-api-key")), state.settings.api_keys)
                response = await method(request, context, call)
            except ServiceError as e:
                self._record(call, e.status_code, e.code)
                if e.status_code >= 500 and e.status_code != 503:
                    log.warning("request failed: %s", e.message, extra={"code": e.code})
                await context.abort(status_of(e), e.message, trailing_metadata=(("deit-error-code", e.code),))
                raise  # abort raises; never reached
            except asyncio.CancelledError:
                self._record(call, HTTP_STATUS[grpc.StatusCode.CANCELLED], "client_closed_request")
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("unhandled error")
                self._record(call, 500, "internal_error")
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
                raise
            self._record(call, 200, None)
            return response

        return handle

    def _record(self, call: Call, status: int, error_code: str | None) -> None:
        path = f"/{SERVICE}/{call.method}"
        trace_id = call.trace.trace_id if call.trace is not None else None
        record = RequestRecord(
            call.request_id, "POST", path, path, "grpc", status, time.perf_counter() - call.started, call.model,
            call.version, call.stats, error_code, trace_id, call.inference,
        )  # fmt: skip
        record_request(self.state.metrics, self.state.settings.access_log and call.method not in OPEN_METHODS, record)
        if call.trace is not None:
            call.trace.end(path, status, {"deit.model": call.model, "deit.version": call.version})
