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


# gRPC code → the HTTP status the request metrics and access log record, so that one error-rate query covers
# every front door.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}
