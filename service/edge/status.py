"""The single place where domain errors become gRPC status codes."""

from __future__ import annotations

import grpc

from service.core import errors

# Most specific classes first is not needed: lookup walks the exception's MRO.
_STATUS_BY_ERROR: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.BackendError: grpc.StatusCode.INTERNAL,
}

INTERNAL_MESSAGE = "internal error; quote request id {request_id} when reporting it"


def status_for(exc: BaseException) -> grpc.StatusCode:
    """gRPC status code for ``exc``: its domain class, else INTERNAL for anything unexpected."""
    for cls in type(exc).__mro__:
        code = _STATUS_BY_ERROR.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


# A status message travels in the trailing headers, whose size the client bounds (8 KiB by
# default): a longer one would turn the status into a transport RESOURCE_EXHAUSTED there.
# Messages quote request text only through errors.shorten; this is the backstop.
MAX_MESSAGE_CHARS = 1024


def client_message(exc: BaseException, request_id: str) -> str:
    """Message sent to the client: the domain message (at most :data:`MAX_MESSAGE_CHARS`),
    or a generic one for bugs."""
    if isinstance(exc, errors.ServiceError) and not isinstance(exc, errors.BackendError):
        message = exc.message
        return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS - 1] + "\u2026"
    return INTERNAL_MESSAGE.format(request_id=request_id)
