"""Errors on the wire: the rich gRPC status of a typed error, and requests that do not decode.

* :func:`status_for`: a :class:`~seqsal.errors.SeqsalError` becomes its status code, with a
  ``google.rpc.BadRequest`` detail naming the field when there is one;
* :func:`rate_limited_status`: RESOURCE_EXHAUSTED with a ``google.rpc.RetryInfo`` detail;
* :func:`tolerant_deserializer`: a request that cannot be decoded (e.g. invalid UTF-8 in a
  string field) becomes an :class:`UndecodableRequest`, answered INVALID_ARGUMENT naming the
  field instead of grpc's opaque INTERNAL.

:mod:`server_kit.call_lifecycle` applies them to every call; the clients map the status back into
the same exception classes (:mod:`seqsal.errors`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.protobuf.internal import decoder
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from seqsal.errors import InvalidArgumentError, SeqsalError, capped


class UndecodableRequest:
    """Stands in for a request whose bytes did not parse; the interceptor answers INVALID_ARGUMENT."""

    def __init__(self, error: InvalidArgumentError) -> None:
        self.error = error


def _invalid_utf8_field(message_class: type[message.Message], data: bytes) -> str | None:
    """Name of the first string field (top level or nested) whose bytes are not UTF-8."""
    descriptor = message_class.DESCRIPTOR
    pos = 0
    try:
        while pos < len(data):
            tag, pos = decoder._DecodeVarint(data, pos)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                _, pos = decoder._DecodeVarint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                length, pos = decoder._DecodeVarint(data, pos)
                chunk, pos = data[pos : pos + length], pos + length
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                if field.type == field.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return field.name
                elif field.type == field.TYPE_MESSAGE:
                    inner = _invalid_utf8_field(field.message_type._concrete_class, chunk)
                    if inner:
                        return f"{field.name}.{inner}"
            else:
                return None
    except (IndexError, ValueError, AttributeError):
        return None
    return None


def tolerant_deserializer(
    message_class: type[message.Message], deserialize: Callable[[bytes], Any]
) -> Callable[[bytes], Any]:
    """Wrap a request deserializer so undecodable bytes become an INVALID_ARGUMENT naming the field."""

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:
            field = _invalid_utf8_field(message_class, data)
            if field:
                error = InvalidArgumentError(
                    f"{field} is not valid UTF-8; send text fields as UTF-8", field=field
                )
            else:
                error = InvalidArgumentError(
                    f"the request is not a valid {message_class.DESCRIPTOR.full_name} message ({exc})"
                )
            return UndecodableRequest(error)

    return parse


def status_for(error: SeqsalError) -> grpc.Status:
    """A rich gRPC status for an error, with a BadRequest detail when it names a field."""
    text = capped(error.message)  # headers carry it: an echoed 1 MB value must not break the status
    status = status_pb2.Status(code=getattr(code_pb2, error.code.name), message=text)
    if error.field:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=capped(error.field, 200), description=text
                    )
                ]
            )
        )
        status.details.append(detail)
    return rpc_status.to_status(status)


def rate_limited_status(message: str, retry_after_s: float) -> grpc.Status:
    """RESOURCE_EXHAUSTED with a RetryInfo detail saying when to retry."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(1, int(retry_after_s * 1e9)))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail])
    return rpc_status.to_status(status)
