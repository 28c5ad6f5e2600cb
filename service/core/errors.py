"""The gateway's one exception tree.

Every error a client can cause, or that the serving stack can hit, is a subclass of
:class:`ServiceError` with a message a client developer can act on. The mapping to gRPC
status codes lives in :mod:`service.edge.status` and nowhere else; this module imports no
gRPC so that the pipeline, cache and backends stay transport-free.

Messages must never contain patient data (names, IDs, DICOM tag values): they are sent
to the client and may be logged.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of all domain errors; ``str(exc)`` is the client-facing message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


ECHO_CHARS = 64


def shorten(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr`` of request text echoed in a message (an image id, a model name), cut to
    ``limit`` characters plus an ellipsis, so a long one cannot blow up the status message."""
    text = str(value)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "\u2026"


# --- the client sent something wrong -------------------------------------------------
class InvalidArgument(ServiceError):
    """The request is malformed; retrying it unchanged will fail again."""


class InvalidImage(InvalidArgument):
    """Image bytes cannot be decoded, or the pixel array has a bad dtype/shape/values."""


class InvalidPrompt(InvalidArgument):
    """A prompt is malformed or does not fit the image (outside it, zero area, NaN)."""


class UnsupportedPrompt(InvalidArgument):
    """The model does not support this kind of prompt (e.g. points on a box-only model)."""


# --- something named in the request does not exist ------------------------------------
class NotFound(ServiceError):
    """A named resource does not exist."""


class ModelNotFound(NotFound):
    """No model of that name is served."""


class ImageNotFound(NotFound):
    """The ``image_id`` is unknown or its embedding has been evicted; send the image again."""


class VolumeNotFound(NotFound):
    """The ``volume_id`` is unknown, expired, deleted or another caller's; upload again."""


class SegmentNotFound(NotFound):
    """The ``segment_id`` is unknown on a known volume."""


class SeriesNotFound(NotFound):
    """The PACS has no such study/series (or none of its instances could be retrieved)."""


# --- limits ---------------------------------------------------------------------------
class ResourceExhausted(ServiceError):
    """A configured limit was hit (payload size, in-flight requests)."""


class PayloadTooLarge(ResourceExhausted):
    """The image or request is larger than the configured limit."""


class VolumeTooLarge(PayloadTooLarge):
    """One uploaded volume is over --max-volume-bytes."""

    reason = "volume_bytes"


class VolumesFull(ResourceExhausted):
    """Stored volumes (all, or the caller's) would be over their bound."""

    reason = "volumes_bytes"


class Overloaded(ResourceExhausted):
    """Too many requests in flight; retry with backoff."""


class Refused(Overloaded):
    """Admission refused the call before it ran (service/edge/admission.py): ``reason`` says
    which bound (queue_full, request_memory, abandoned, caller_inflight, caller_rate) and
    ``retry_after_s``, when waiting helps, how long to wait."""

    def __init__(self, message: str, reason: str = "refused", retry_after_s: float | None = None) -> None:
        if retry_after_s is not None:
            message = f"{message} (retry after {retry_after_s * 1000:.0f} ms)"
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class AnswerTooLarge(ResourceExhausted):
    """The answer would exceed the gateway's send limit (--max-request-bytes); refused
    before the work where its size can be told from the request, else as soon as it shows."""

    reason = "answer_size"


# --- the serving stack ----------------------------------------------------------------
class Unavailable(ServiceError):
    """The backend (Triton, ONNX Runtime session) is not ready; retry later."""


class PacsUnavailable(Unavailable):
    """The configured PACS cannot be reached, timed out, answered a server error, or refused
    the gateway's own credentials (the operator's to fix; retry later)."""


class FailedPrecondition(ServiceError):
    """The system is not in a state the call needs; retrying unchanged fails again until that
    state changes (gRPC FAILED_PRECONDITION)."""


class PacsRefused(FailedPrecondition):
    """The PACS refused to store an object (STOW-RS); the message carries its reason (the
    PACS's status and failure reason codes, never a tag value)."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before the backend answered."""


class Unauthenticated(ServiceError):
    """Missing or invalid credentials."""


class PermissionDenied(ServiceError):
    """The caller is authenticated but not allowed to do this."""


class BackendError(ServiceError):
    """The backend failed in a way that is our bug, not the client's (bad tensor, crash)."""


# --- start-up -------------------------------------------------------------------------
class StartupError(RuntimeError):
    """The gateway cannot start serving (no models, missing or corrupt model files, unsafe
    or incomplete security settings). Not a client error: ``main()`` prints it and exits."""
