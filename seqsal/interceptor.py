"""The one place where exceptions become gRPC status codes (used by every seqsal server).

* :class:`~seqsal.errors.SeqsalError` subclasses map to their status code, with
  a ``google.rpc.BadRequest`` detail naming the field when there is one.
* A request that cannot be decoded (e.g. invalid UTF-8 in a string field) is
  INVALID_ARGUMENT naming the field, instead of grpc's opaque INTERNAL.
* Anything else is a bug: logged with its traceback, INTERNAL to the client;
  the server keeps serving.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, message
from google.protobuf.internal import decoder
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_interceptor.server import AsyncServerInterceptor
from grpc_status import rpc_status

from seqsal.errors import InternalError, InvalidArgumentError, SeqsalError, capped
from seqsal.logging_setup import request_id_var
from seqsal.request_ids import REQUEST_ID_KEY, new_request_id

logger = logging.getLogger("seqsal.grpc")


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


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The call's request id (set by the access interceptor), the caller's ``x-request-id``, or a new id."""
    current = request_id_var.get()
    if current:
        return current
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return str(value)
    return new_request_id()


class ErrorInterceptor(AsyncServerInterceptor):
    """Maps exceptions to gRPC status for unary and server-streaming handlers."""

    def __init__(self, request_classes: dict[str, type[message.Message]]) -> None:
        self.request_classes = request_classes

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        message_class = self.request_classes.get(handler_call_details.method)
        if handler is None or message_class is None or handler.request_deserializer is None:
            return await super().intercept_service(lambda _: _resolved(handler), handler_call_details)
        wrapped = handler._replace(
            request_deserializer=tolerant_deserializer(message_class, handler.request_deserializer)
        )
        return await super().intercept_service(lambda _: _resolved(wrapped), handler_call_details)

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception, method_name: str) -> None:
        if isinstance(exc, SeqsalError):
            error = exc
            logger.info("%s -> %s: %s", method_name, error.code.name, error.message)
        else:
            rid = request_id(context)
            logger.exception("%s failed (request id %s)", method_name, rid)
            error = InternalError(
                f"internal error while serving {method_name} (request id {rid}); the server log has details"
            )
        status = status_for(error)
        trailers = (*status.trailing_metadata, (REQUEST_ID_KEY, request_id(context)))
        await context.abort(status.code, status.details, trailers)

    async def intercept(
        self, method: Callable, request: Any, context: grpc.aio.ServicerContext, method_name: str
    ) -> Any:
        if isinstance(request, UndecodableRequest):
            await self._abort(context, request.error, method_name)
        try:
            result = method(request, context)
            if inspect.isasyncgen(result):
                return self._stream(result, context, method_name)
            return await result
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._abort(context, exc, method_name)

    async def _stream(
        self, stream: AsyncIterator[Any], context: grpc.aio.ServicerContext, method_name: str
    ) -> AsyncIterator[Any]:
        try:
            async for item in stream:
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._abort(context, exc, method_name)


async def _resolved(value: Any) -> Any:
    return value
