"""Typed errors shared by servers and clients.

Servers raise these; one interceptor (:mod:`server_kit.call_lifecycle`) turns them into gRPC status
codes with a ``google.rpc.BadRequest`` detail naming the field; the client turns the status
back into the same exception class. So every layer speaks one error language.
"""

from __future__ import annotations

import grpc

#: Longest status message sent, in UTF-8 bytes: the message (percent-encoded) and its BadRequest
#: detail (base64) travel in trailing headers, which clients drop past 8 KiB.
MAX_MESSAGE_BYTES = 1024


def quote(value: str, limit: int = 80) -> str:
    """``repr`` of a client-sent value for an error message, cut to ``limit`` chars."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} chars)"


def capped(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` cut to at most ``limit`` UTF-8 bytes, saying that it was cut."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    return data[: limit - 48].decode("utf-8", "ignore") + f"… (message cut from {len(data)} bytes)"


class SeqsalError(Exception):
    """Base class: a request failed with a gRPC status code and a clear message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(SeqsalError):
    """The request is malformed; ``field`` names the offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(SeqsalError):
    """The named model (or other resource) does not exist on this server."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhaustedError(SeqsalError):
    """The server is at capacity (queue full, rate limit); retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class CancelledError(SeqsalError):
    """The client cancelled the request or its deadline passed."""

    code = grpc.StatusCode.CANCELLED


class DeadlineExceededError(SeqsalError):
    """The request's deadline passed before it finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(SeqsalError):
    """The server cannot be reached or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(SeqsalError):
    """Missing or wrong credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(SeqsalError):
    """Credentials are valid but not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPreconditionError(SeqsalError):
    """The server is not in a state to serve this (e.g. model not loaded)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class InternalError(SeqsalError):
    """A bug on the server; the message says what to report."""

    code = grpc.StatusCode.INTERNAL


ERRORS_BY_CODE: dict[grpc.StatusCode, type[SeqsalError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        ResourceExhaustedError,
        CancelledError,
        DeadlineExceededError,
        UnavailableError,
        UnauthenticatedError,
        PermissionDeniedError,
        FailedPreconditionError,
        InternalError,
    )
}
