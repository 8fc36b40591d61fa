"""Every call's life on a seqsal server, in one interceptor: way in, answer or error, way out.

:class:`CallLifecycle` is the only interceptor of each server (:mod:`server_kit.grpc_server`). For
every call of a seqsal service, in this order:

1. the request id is the caller's ``x-request-id`` metadata or a new one (:mod:`seqsal.request_ids`);
   it is put in :data:`~server_kit.logging_setup.request_id_var` (so every log line of the call
   carries it) and sent back in the response's initial metadata, together with the answer (the
   first message of a stream) or a refusal: headers sent any earlier would commit the call, and
   gRPC could no longer retry it on another replica, or on the same one restarted, when the
   server dies mid-call (see :mod:`seqsal.retry`); a failed call has it in its trailing metadata;
2. the bearer token is checked (UNAUTHENTICATED) and the caller's rate is charged
   (RESOURCE_EXHAUSTED with a ``google.rpc.RetryInfo`` detail); a caller is its token's
   fingerprint, or its address when the server runs without authentication;
3. the handler runs; whatever it raises becomes a gRPC status in this one place
   (:mod:`seqsal.status`): a :class:`~seqsal.errors.SeqsalError` its code and a
   ``google.rpc.BadRequest`` naming the field, a request that did not decode INVALID_ARGUMENT
   naming the field, anything else (a bug) INTERNAL quoting the request id, with the traceback
   in the log; the server keeps serving;
4. when the call ends, however it ends: ``seqsal_grpc_*`` metrics, one access log line
   (``seqsal.access``: rpc, status, duration_ms, peer, client) and, with tracing on, the span.

Open methods (health, reflection) pass straight through: probes are neither logged nor counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message

from seqsal.errors import InternalError, SeqsalError
from seqsal.request_ids import REQUEST_ID_KEY, clean_request_id, new_request_id
from seqsal.status import UndecodableRequest, rate_limited_status, status_for, tolerant_deserializer
from server_kit.auth import AuthFailure, TokenAuth, fingerprint, is_open_method
from server_kit.logging_setup import request_id_var
from server_kit.metrics import ServerMetrics
from server_kit.ratelimit import RateLimited, RateLimiter
from server_kit.tracing import end_span, start_span

#: Who makes the current call, for the saliency scheduler's fairness: ``token:<fingerprint>``
#: with authentication, else ``peer:<address:port>`` (one connection); ``local`` in-process.
client_var: ContextVar[str] = ContextVar("seqsal_client", default="local")
#: RPCs the rate limit does not count: cheap reads that clients poll while a call is in flight.
UNMETERED_RPCS = frozenset({"GetRequestStatus"})

access_logger = logging.getLogger("seqsal.access")
error_logger = logging.getLogger("seqsal.grpc")


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:1.2.3.4:5678`` -> ``1.2.3.4``), without the port."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, _port = rest.rpartition(":")
        return host.strip("[]") or rest
    return peer


@dataclass
class _Call:
    """What the interceptor knows about one call in progress."""

    path: str  # /package.Service/Method
    rpc: str
    request_id: str
    started: float
    peer: str
    client: str | None = None
    span: Any = None
    headers_sent: bool = False

    async def send_headers(self, context: grpc.aio.ServicerContext) -> None:
        """Send the initial metadata (the request id), once."""
        if not self.headers_sent:
            self.headers_sent = True
            await context.send_initial_metadata(((REQUEST_ID_KEY, self.request_id),))


class CallLifecycle(grpc.aio.ServerInterceptor):
    """Request ids, authentication, rate limits, errors to status, metrics, access logs and spans.

    Args:
        request_classes: full method path -> request message class, for the tolerant decoding
            of requests (:func:`~seqsal.status.tolerant_deserializer`).
        auth: accepted tokens; None = no authentication.
        limiter: per-caller rate limit; None = none.
        metrics: where call counts and latencies go; None = nowhere.
        tracer: an OpenTelemetry tracer, or None.
    """

    def __init__(
        self,
        request_classes: dict[str, type[message.Message]],
        *,
        auth: TokenAuth | None = None,
        limiter: RateLimiter | None = None,
        metrics: ServerMetrics | None = None,
        tracer: Any = None,
    ) -> None:
        self.request_classes = request_classes
        self.auth = auth
        self.limiter = limiter
        self.metrics = metrics
        self.tracer = tracer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        path = handler_call_details.method
        if handler is None or is_open_method(path):
            return handler
        message_class = self.request_classes.get(path)
        if message_class is not None and handler.request_deserializer is not None:
            handler = handler._replace(
                request_deserializer=tolerant_deserializer(message_class, handler.request_deserializer)
            )
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, path))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(handler.stream_unary, path))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._streaming(handler.unary_stream, path))
        return handler._replace(stream_stream=self._streaming(handler.stream_stream, path))

    # --- the wrappers ----------------------------------------------------------------------------

    def _unary(self, behavior: Callable[..., Any], path: str) -> Callable[..., Awaitable[Any]]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = self._begin(path, context)
            code = "UNKNOWN"
            try:
                await self._admit(call, context)
                async with self._errors_to_status(call, context):
                    _raise_if_undecodable(request)
                    result = behavior(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                await call.send_headers(context)
                code = _final_code(context, "OK")
                return result
            except BaseException as exc:
                code = _code_of(exc, context)
                raise
            finally:
                self._end(call, code)

        return unary

    def _streaming(self, behavior: Callable[..., Any], path: str) -> Callable[..., AsyncIterator[Any]]:
        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = self._begin(path, context)
            code = "UNKNOWN"
            try:
                await self._admit(call, context)
                async with self._errors_to_status(call, context):
                    _raise_if_undecodable(request)
                    result = behavior(request, context)
                    if inspect.isasyncgen(result):
                        async for item in result:
                            await call.send_headers(context)
                            yield item
                    elif inspect.isawaitable(result):
                        await result
                code = _final_code(context, "OK")
            except GeneratorExit:
                code = "CANCELLED"
                raise
            except BaseException as exc:
                code = _code_of(exc, context)
                raise
            finally:
                self._end(call, code)

        return streaming

    # --- the steps -------------------------------------------------------------------------------

    def _begin(self, path: str, context: grpc.aio.ServicerContext) -> _Call:
        metadata = context.invocation_metadata() or ()
        rid = None
        for key, value in metadata:
            if key == REQUEST_ID_KEY:
                rid = clean_request_id(value)
                break
        rid = rid or new_request_id()
        request_id_var.set(rid)  # this call's task (and its to_thread workers) see it
        client_var.set(f"peer:{context.peer()}")
        call = _Call(
            path=path,
            rpc=path.rsplit("/", 1)[-1],
            request_id=rid,
            started=time.perf_counter(),
            peer=context.peer(),
        )
        if self.metrics is not None:
            self.metrics.in_progress.labels(call.rpc).inc()
        if self.tracer is not None:
            carrier = {k: v for k, v in metadata if isinstance(v, str)}
            call.span = start_span(self.tracer, path, carrier, rid)
        return call

    async def _admit(self, call: _Call, context: grpc.aio.ServicerContext) -> None:
        """Authenticate and rate-limit; aborts the call when either says no."""
        if self.auth is not None:
            try:
                token = self.auth.authenticate(context.invocation_metadata() or ())
            except AuthFailure as failure:
                await call.send_headers(context)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(failure))
                raise  # abort raises; this is never reached
            call.client = f"token:{fingerprint(token)}"
            client_var.set(call.client)
        if self.limiter is not None and call.rpc not in UNMETERED_RPCS:
            try:
                self.limiter.acquire(call.client or f"peer:{peer_host(call.peer)}")
            except RateLimited as limited:
                status = rate_limited_status(limited.message, limited.retry_after_s)
                await call.send_headers(context)
                await context.abort(status.code, status.details, status.trailing_metadata)

    @contextlib.asynccontextmanager
    async def _errors_to_status(self, call: _Call, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """What the handler raises ends the call with its gRPC status (as ``grpc.aio.AbortError``)."""
        try:
            yield
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._abort(call, context, exc)

    async def _abort(self, call: _Call, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        """End the call with the status of what the handler raised (raises ``grpc.aio.AbortError``)."""
        if isinstance(exc, SeqsalError):
            error = exc
            error_logger.info("%s -> %s: %s", call.path, error.code.name, error.message)
        else:
            error_logger.exception("%s failed (request id %s)", call.path, call.request_id)
            error = InternalError(
                f"internal error while serving {call.path} (request id {call.request_id}); "
                "the server log has details"
            )
        status = status_for(error)
        trailers = (*status.trailing_metadata, (REQUEST_ID_KEY, call.request_id))
        await context.abort(status.code, status.details, trailers)

    def _end(self, call: _Call, code: str) -> None:
        seconds = time.perf_counter() - call.started
        if self.metrics is not None:
            self.metrics.in_progress.labels(call.rpc).dec()
            self.metrics.observe_call(call.rpc, code, seconds)
        if call.span is not None:
            end_span(call.span, code)
        duration_ms = round(seconds * 1000.0, 3)
        access_logger.info(
            "%s %s %.1f ms",
            call.rpc,
            code,
            duration_ms,
            extra={
                "rpc": call.rpc,
                "status": code,
                "duration_ms": duration_ms,
                "peer": call.peer,
                "client": call.client,
                "request_id": call.request_id,
            },
        )


def _raise_if_undecodable(request: Any) -> None:
    if isinstance(request, UndecodableRequest):
        raise request.error


def _final_code(context: grpc.aio.ServicerContext, default: str) -> str:
    """The status a handler set without raising (``context.set_code``), or ``default``."""
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        return default
    return _code_name(code) or default


def _code_name(code: object) -> str | None:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return member.name
    return None


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The status a call ended with, from the exception that ended it."""
    if isinstance(exc, grpc.aio.AbortError):
        return _final_code(context, "UNKNOWN")
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "UNKNOWN"
