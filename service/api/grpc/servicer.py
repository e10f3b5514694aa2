"""``inference.GRPCInferenceService``: a thin transport over the steps the REST V2 routes take (``accepting_model``,
``admission``, the V2 codec, ``Admission.infer``, the shared post-processing of ``service.api.results``), with errors
mapped in ``status.py``.

Each call is counted in the request metrics (``protocol="grpc"``, the HTTP status its error has, 200 when OK) and
logged in the access log like an HTTP request. The call's deadline is the request's deadline, and a call the client
cancels cancels the request: its images not yet decoded or batched never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from service import __version__
from service.api.admission import Admission, AppState, accepting_model, admission
from service.api.control import load_model, unload_model
from service.api.grpc import inference_pb2 as pb
from service.api.grpc.codec import build_response, parse_request
from service.api.grpc.status import CLIENT_CLOSED_STATUS, status_of
from service.api.statistics import model_statistics
from service.api.v2 import (
    EXTENSIONS,
    config_of,
    infer_parsed,
    loaded_versions,
    metadata_of,
    output_tensors,
    output_widths,
    resolve_model,
)
from service.engine.lifecycle import Phase
from service.engine.served import ServedModel
from service.errors import ClientGone, ServiceError
from service.http.access_log import RequestRecord, record_request, request_id_of
from service.http.auth import check_key, key_of

log = logging.getLogger("deit_serve.grpc")

SERVICE = "inference.GRPCInferenceService"
OPEN_METHODS = frozenset({"ServerLive", "ServerReady", "ServerMetadata"})  # no API key, as their REST routes
PROBE_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})


@dataclass
class Call:
    """One RPC: its method, metadata, and the record its metrics and log line are made from (as an HTTP request's)."""

    method: str
    metadata: dict[str, str]
    record: RequestRecord  # its arrival (time.monotonic()) is the origin of the call's deadline
    started: float  # time.perf_counter()


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
        rows = await self.state.repository.index(ready_only=request.ready)
        return json_format.ParseDict({"models": rows}, pb.RepositoryIndexResponse(), ignore_unknown_fields=True)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any, call: Call
    ) -> pb.RepositoryModelLoadResponse:
        hub_id = request.parameters["hub_id"].string_param if "hub_id" in request.parameters else None
        await load_model(self.state, request.model_name, hub_id)
        call.record.model = request.model_name  # only a name the repository took labels the metrics (bounded)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any, call: Call
    ) -> pb.RepositoryModelUnloadResponse:
        await unload_model(self.state, request.model_name)
        call.record.model = request.model_name  # as for a load: never a name the repository refused
        return pb.RepositoryModelUnloadResponse()

    # --- inference ----------------------------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any, call: Call) -> pb.ModelInferResponse:
        """The REST V2 infer route's steps: refusals before anything is read, admission with the call's deadline
        (the server's default when it has none), then the request under it; a call that ends first cancels it."""
        state, record = self.state, call.record
        served = accepting_model(state, request.model_name, request.model_version or None)
        record.model, record.version = served.name, str(served.version)
        record.inference = True  # as over REST: a call refused before admission is not an inference
        remaining = context.time_remaining()  # the call's deadline; None: the server's default
        timeout = None if remaining is None else max(remaining, 1e-6)
        with admission(state, served, arrived=record.arrived, timeout_s=timeout, trace=record.trace) as admitted:
            record.batching = admitted.stats
            admitted.reservation.grow(request.ByteSize())  # the message is held until the answer
            gone = ClientGone("the client cancelled the call")
            context.add_done_callback(lambda _: admitted.context.cancel(gone))
            work = asyncio.ensure_future(self._infer(request, admitted, record.arrived))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:  # the call ended first: stop the request, then let its images go
                admitted.context.cancel(gone)
                with contextlib.suppress(Exception):
                    await work
                raise

    async def _infer(self, request: pb.ModelInferRequest, admitted: Admission, arrived: float) -> pb.ModelInferResponse:
        served, context, settings = admitted.served, admitted.context, self.state.settings
        parsed = await self.state.decode_pool.run(
            context,
            lambda: parse_request(
                request, input_size=served.input_size, max_elements=settings.max_files,
                offered=list(output_widths(served)),
            ),
        )  # fmt: skip
        inference, pooling = await infer_parsed(admitted, parsed, arrived)
        tensors = output_tensors(inference, parsed.outputs, pooling)
        return build_response(served.name, str(served.version), parsed.id, parsed.outputs, tensors, served.labels)

    def _model(self, name: str, version: str, call: Call) -> ServedModel:
        served = resolve_model(self.state, name, version or None)
        call.record.model, call.record.version = served.name, str(served.version)
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
            record = RequestRecord(request_id_of(metadata.get("x-request-id", "")), time.monotonic())
            call = Call(name, metadata, record, time.perf_counter())
            if state.tracing is not None and name not in PROBE_METHODS:  # probes are not traced, as over REST
                attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": name}
                record.trace = state.tracing.start_request(f"{SERVICE}/{name}", metadata, attributes)
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
                self._record(call, CLIENT_CLOSED_STATUS, "client_closed_request")
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
        """The call's request metrics and access-log line (as an HTTP request's, ``protocol="grpc"``), and the end
        of its span."""
        path, record = f"/{SERVICE}/{call.method}", call.record
        record.error_code = error_code
        record_request(
            self.state.metrics, self.state.settings.access_log and call.method not in OPEN_METHODS, record,
            method="POST", path=path, endpoint=path, protocol="grpc", status=status,
            elapsed=time.perf_counter() - call.started,
        )  # fmt: skip
        if record.trace is not None:
            record.trace.end(path, status, {"deit.model": record.model, "deit.version": record.version})
