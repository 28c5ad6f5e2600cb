"""The one mapping from domain errors to gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

from service.core import errors
from service.edge.status import client_message, status_for

EXPECTED = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidImage: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidPrompt: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnsupportedPrompt: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ImageNotFound: grpc.StatusCode.NOT_FOUND,
    errors.VolumeNotFound: grpc.StatusCode.NOT_FOUND,
    errors.SegmentNotFound: grpc.StatusCode.NOT_FOUND,
    errors.SeriesNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.VolumeTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.VolumesFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Refused: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.AnswerTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.PacsUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PacsRefused: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.BackendError: grpc.StatusCode.INTERNAL,
}


def test_every_domain_error_class_has_a_status():
    classes = {errors.ServiceError}
    frontier = [errors.ServiceError]
    while frontier:
        for sub in frontier.pop().__subclasses__():
            if sub.__module__ == errors.__name__:   # a module's private subclass maps through its parent
                classes.add(sub)
            frontier.append(sub)
    assert classes - {errors.ServiceError} == set(EXPECTED)


@pytest.mark.parametrize("cls", sorted(EXPECTED, key=lambda c: c.__name__))
def test_domain_error_maps_to_its_status_and_keeps_its_message(cls):
    exc = cls("box lies outside the image")
    assert status_for(exc) == EXPECTED[cls]
    if cls is errors.BackendError:
        assert "box" not in client_message(exc, "req-1") and "req-1" in client_message(exc, "req-1")
    else:
        assert client_message(exc, "req-1") == "box lies outside the image"


CANARY = "Doe^Jane-1957-MRN4242"  # patient-like text that must never reach the client


@pytest.mark.parametrize("exc", [KeyError(CANARY), ValueError(f"bad value {CANARY}"), ZeroDivisionError(),
                                 RuntimeError(CANARY), OSError(2, CANARY, f"/data/{CANARY}.dcm"),
                                 errors.BackendError(f"decoder failed on {CANARY}")],
                         ids=["KeyError", "ValueError", "ZeroDivisionError-no-args", "RuntimeError", "OSError",
                              "BackendError"])
def test_unexpected_exception_is_internal_with_a_generic_message(exc):
    assert status_for(exc) == grpc.StatusCode.INTERNAL
    message = client_message(exc, "abc123")
    # Each check on its own: every exception, whatever its str(), must carry the request id and
    # leak nothing of its arguments (KeyError's str() adds quotes, so look for the bare text).
    assert "abc123" in message, message
    assert CANARY not in message, message
    assert "Doe" not in message and "MRN" not in message, message
    assert message == client_message(ZeroDivisionError(), "abc123")  # the one generic text, whatever the bug
