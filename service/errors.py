"""One error hierarchy for the whole service; ``status_code`` and ``code`` are mapped to HTTP in ``app.py``."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a client or operator may see. ``code`` is a stable machine-readable name."""

    status_code: int = 500
    code: str = "internal_error"
    headers: dict[str, str] | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- start-up / loading (operator errors) -------------------------------------------------------------------


class CheckpointError(ServiceError):
    """A checkpoint or its config cannot be loaded as a DeiT model."""

    code = "checkpoint_error"


class ModelStoreError(ServiceError):
    """The model store is empty, unreadable or ambiguous."""

    code = "model_store_error"


class ModelLoadFailed(ModelStoreError):
    """One model of the store could not be loaded or warmed up; start-up stops, naming the model and its files."""

    code = "model_load_failed"

    def __init__(self, model: str, source: str, message: str) -> None:
        super().__init__(f"model {model!r} ({source}): {message}")
        self.model = model
        self.source = source


class MissingExtra(ServiceError):
    """A setting asks for an optional feature whose packages are not installed; start-up stops naming them."""

    code = "missing_extra"


class RepositoryLoadFailed(ServiceError):
    """A load asked for at run time failed; whatever was serving before still serves."""

    status_code = 400
    code = "model_load_failed"


# --- request errors -------------------------------------------------------------------------------------------


class BadRequest(ServiceError):
    status_code = 400
    code = "bad_request"


class TaskNotSupported(BadRequest):
    """The model does not do what was asked (classification by a model without a classification head)."""

    code = "task_not_supported"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}  # noqa: RUF012


class Forbidden(ServiceError):
    """The operator has not allowed what was asked (e.g. a download by hub id at run time)."""

    status_code = 403
    code = "forbidden"


class ModelNotFound(ServiceError):
    status_code = 404
    code = "model_not_found"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class TooManyFiles(PayloadTooLarge):
    code = "too_many_files"


class ImageTooLarge(PayloadTooLarge):
    """Pixel count above the limit: decompression bombs end here."""

    code = "image_too_large"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidImage(ServiceError):
    """Looks like an image format we know but cannot be decoded (truncated, corrupt)."""

    status_code = 422
    code = "invalid_image"


class EmptyUpload(ServiceError):
    status_code = 422
    code = "empty_upload"


class InvalidParameter(ServiceError):
    status_code = 422
    code = "invalid_parameter"


class RequestTimeout(ServiceError):
    """The client did not send its body within the request's deadline."""

    status_code = 408
    code = "request_timeout"
    headers = {"Connection": "close"}  # noqa: RUF012


# --- capacity / lifecycle -------------------------------------------------------------------------------------


class Overloaded(ServiceError):
    """The model's queue is full: reject at once rather than queue without bound."""

    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class ShuttingDown(ServiceError):
    status_code = 503
    code = "shutting_down"
    headers = {"Retry-After": "1", "Connection": "close"}  # noqa: RUF012


class ModelRetired(ServiceError):
    """The version a request ran on was unloaded or replaced, and its drain timeout passed before the answer."""

    status_code = 503
    code = "model_unloaded"
    headers = {"Retry-After": "1"}  # noqa: RUF012


class NotReady(ServiceError):
    status_code = 503
    code = "not_ready"
    headers = {"Retry-After": "1"}  # noqa: RUF012


class DeadlineExceeded(ServiceError):
    status_code = 504
    code = "deadline_exceeded"


class ClientGone(ServiceError):
    """The client disconnected before its batch ran; nobody reads this answer (499 in logs)."""

    status_code = 499
    code = "client_closed_request"


class InferenceFailed(ServiceError):
    status_code = 500
    code = "inference_failed"
