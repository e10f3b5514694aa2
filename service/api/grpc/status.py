"""The one place where our error kinds become gRPC status codes (as ``app.py`` maps them to HTTP)."""

from __future__ import annotations

import grpc

from service.errors import ServiceError

# By HTTP status, then by the error's code where one HTTP status covers kinds a gRPC client tells apart.
_BY_CODE = {
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,  # the queue or the upload budget is full: retry later
    "shutting_down": grpc.StatusCode.UNAVAILABLE,
    "not_ready": grpc.StatusCode.UNAVAILABLE,
    "task_not_supported": grpc.StatusCode.FAILED_PRECONDITION,
    "model_load_failed": grpc.StatusCode.FAILED_PRECONDITION,
}
_BY_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # as gRPC answers a message over its size limit
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_of(error: ServiceError) -> grpc.StatusCode:
    return _BY_CODE.get(error.code) or _BY_STATUS.get(error.status_code, grpc.StatusCode.INTERNAL)


# The HTTP status a call its client cancelled is recorded with in the request metrics and access log (as an HTTP
# request whose client went away), so that one error-rate query covers every front door.
CLIENT_CLOSED_STATUS = 499
