"""The app factory: settings in, a FastAPI app out; the lifespan loads models in the background and drains."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import torch
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.api import hf, v2
from service.api.admission import AppState
from service.api.native import router
from service.engine.decode_pool import DecodePool
from service.engine.lifecycle import Lifecycle, Phase
from service.engine.repository import Repository
from service.engine.store_files import poll_store
from service.errors import CheckpointError, ModelLoadFailed, ServiceError
from service.http.access_log import AccessLogMiddleware, request_record
from service.http.front_door import plain_error_body
from service.http.responses import json_response
from service.http.upload_budget import UploadBudget, default_budget_bytes
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("deit_serve.app")

_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def create_app(settings: Settings, on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """Build the app. ``on_fatal`` is called if the models cannot be loaded (the CLI then exits non-zero)."""
    metrics = Metrics(settings.max_batch_size)
    lifecycle = Lifecycle()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        pool = DecodePool(settings.preprocess_threads)
        repository = Repository.open(settings, metrics, pool)
        lifecycle.on_abandon(repository.store.abandon)
        budget_bytes = settings.max_inflight_upload_bytes or default_budget_bytes(settings.max_upload_bytes)
        budget = UploadBudget(budget_bytes, metrics.upload_bytes)
        app.state.deit = AppState(settings, metrics, lifecycle, repository, pool, budget)
        loading = asyncio.create_task(_load_models(repository, lifecycle, metrics, on_fatal), name="load-models")
        app.state.loading = loading
        try:
            yield
        finally:
            lifecycle.begin_drain()
            metrics.ready.set(0)
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await lifecycle.wait_idle(settings.drain_timeout_s)
            await repository.close()
            pool.shutdown()

    app = FastAPI(
        title="deit-serve",
        version=__version__,
        description="Image classification with DeiT models, batched dynamically across requests.",
        lifespan=lifespan,
    )
    app.include_router(router)
    app.include_router(v2.router)
    app.include_router(hf.router)
    # The documentation routes (/openapi.json, /docs, /redoc) do not mark the request with their route as the
    # API's own do; their fixed paths name them in the metrics instead.
    fixed_paths = frozenset(path for route in app.routes if "{" not in (path := getattr(route, "path", "{")))
    app.add_middleware(AccessLogMiddleware, metrics=metrics, access_log=settings.access_log, fixed_paths=fixed_paths)
    _install_error_handlers(app)
    app.state.lifecycle = lifecycle
    return app


async def _load_models(
    repository: Repository, lifecycle: Lifecycle, metrics: Metrics, on_fatal: Callable[[], None] | None
) -> None:
    """Load the store in a thread, then start the batchers. ANY failure ends start-up: one error line (naming the
    model and its files when one failed) and ``on_fatal``, never a service left "starting" for ever."""
    try:
        await asyncio.to_thread(repository.load_all)
        for served in repository.store.all_served():
            served.start()
    except Exception as e:
        message = e.message if isinstance(e, ServiceError) else f"{type(e).__name__}: {e}"
        lifecycle.phase, lifecycle.error = Phase.FAILED, message
        fields: dict[str, object] = {"code": e.code if isinstance(e, ServiceError) else "internal_error"}
        if isinstance(e, ModelLoadFailed):
            fields |= {"model": e.model, "source": e.source}
        log.error("model store failed to load: %s", message, extra=fields, exc_info=_unexpected_cause(e))
        if on_fatal is not None:
            on_fatal()
        return
    if lifecycle.phase is Phase.STARTING:
        lifecycle.phase = Phase.READY
        metrics.ready.set(1)
        store = repository.store
        log.info("ready", extra={"models": sorted(store.models), "default_model": store.default_name})
    settings = repository.settings
    if settings.poll_store_s > 0:  # ends when the lifespan cancels this task
        await poll_store(settings.model_store, settings.poll_store_s, repository.sync)


def _unexpected_cause(error: BaseException) -> BaseException | None:
    """The first error in the chain that is not one of our own checks: its traceback goes in the same JSON line.
    None when a checkpoint was found at fault: its message names the file and what is wrong with it."""
    cause: BaseException | None = error
    while isinstance(cause, ServiceError):
        if isinstance(cause, CheckpointError):
            return None
        cause = cause.__cause__
    return cause


def _error(request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {"error": message} if plain_error_body(request) else {"error": {"code": code, "message": message}}
    return json_response(body, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """The one place where errors become HTTP responses: ``{"error": {"code", "message"}}``, or
    ``{"error": "<message>"}`` on the Open Inference Protocol and Hugging Face paths (their clients read that)."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        request_record(request).error_code = exc.code
        if exc.status_code >= 500 and exc.status_code != 503:
            log.warning("request failed: %s", exc.message, extra={"code": exc.code})
        return _error(request, exc.status_code, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        request_record(request).error_code = "invalid_parameter"
        return _error(request, 422, "invalid_parameter", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return _error(request, exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return _error(request, 500, "internal_error", "internal server error")
