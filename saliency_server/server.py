"""The SaliencyService gRPC servicer and server start-up."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import grpc

from saliency_server.cache import make_cache
from saliency_server.metrics import SaliencyCollector
from saliency_server.model_host import ModelHost
from saliency_server.serving import SaliencyServing
from saliency_server.settings import SaliencySettings
from seqsal.v1 import common_pb2, saliency_pb2, saliency_pb2_grpc
from server_kit.call_lifecycle import client_var
from server_kit.grpc_server import GrpcServer, preflight
from server_kit.metrics import ServerMetrics
from server_kit.model_registry import model_specs

logger = logging.getLogger("seqsal.saliency")

SERVICE = saliency_pb2.DESCRIPTOR.services_by_name["SaliencyService"]
#: After the drain: how long the worker threads get to stop at a checkpoint before the process exits.
SHUTDOWN_WORKER_WAIT_S = 5.0


class SaliencyServicer(saliency_pb2_grpc.SaliencyServiceServicer):
    """Thin gRPC adapter over :class:`SaliencyServing`; :mod:`server_kit.call_lifecycle` maps errors."""

    def __init__(self, serving: SaliencyServing, metrics: ServerMetrics | None = None) -> None:
        self.serving = serving
        self.metrics = metrics

    def _count_tokens(self, response: saliency_pb2.SaliencyResponse) -> None:
        if self.metrics is None:
            return
        prompt = sum(1 for t in response.tokens if t.part == common_pb2.PROMPT)
        self.metrics.count_tokens(response.model, "prompt", prompt)
        self.metrics.count_tokens(response.model, "target", len(response.tokens) - prompt)

    @contextmanager
    def _counting_cancellation(self, rpc: str, context: grpc.aio.ServicerContext) -> Iterator[None]:
        """Count a call that stops early: gRPC cancels the handler when the client cancels or its
        deadline passes, and by the time that reaches here the computation has stopped (the
        serving layer waits for its worker), with nothing of it cached."""
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            if self.metrics is not None:
                remaining = context.time_remaining()
                reason = "deadline" if remaining is not None and remaining <= 0 else "cancelled"
                self.metrics.count_cancelled(rpc, reason)
            raise

    async def Tokenize(
        self, request: common_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.TokenizeResponse:
        return await self.serving.tokenize(request)

    async def Saliency(
        self, request: saliency_pb2.SaliencyRequest, context: grpc.aio.ServicerContext
    ) -> saliency_pb2.SaliencyResponse:
        with self._counting_cancellation("Saliency", context):
            response = await self.serving.saliency(request, client=client_var.get())
        self._count_tokens(response)
        return response

    async def SaliencyAllSegments(
        self, request: saliency_pb2.SaliencyAllSegmentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[saliency_pb2.SaliencyAllSegmentsResponse]:
        first = True
        with self._counting_cancellation("SaliencyAllSegments", context):
            async for message in self.serving.saliency_all_segments(request, client=client_var.get()):
                if first:  # every message repeats the same prompt and target
                    self._count_tokens(message.saliency)
                    first = False
                yield message

    async def Verify(
        self, request: saliency_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> saliency_pb2.VerifyResponse:
        with self._counting_cancellation("Verify", context):
            return await self.serving.verify(request, client=client_var.get())

    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return await self.serving.list_models(request)

    async def GetRequestStatus(
        self, request: saliency_pb2.GetRequestStatusRequest, context: grpc.aio.ServicerContext
    ) -> saliency_pb2.GetRequestStatusResponse:
        return await self.serving.request_status(request)


def build_serving(settings: SaliencySettings) -> SaliencyServing:
    """Load the configured models and cache (slow: loads weights)."""
    host = ModelHost.load(model_specs(settings), settings)
    return SaliencyServing(host, make_cache(settings), settings)


def build_server(serving: SaliencyServing, settings: SaliencySettings) -> GrpcServer:
    """A ready-to-start server for ``serving`` (health and reflection included)."""
    server = GrpcServer(settings, [SERVICE], name="saliency")
    metrics = server.metrics
    metrics.watch(SaliencyCollector([serving.cache], serving.schedulers))
    admission = serving.admission
    metrics.watch_queue(lambda: {"running": admission.running, "waiting": admission.waiting})
    # a broken engine (e.g. a CUDA error) takes the replica out of rotation: health NOT_SERVING
    serving.on_health = lambda ok: asyncio.ensure_future(server.set_serving(ok))
    for info in serving.host.infos():
        metrics.model_load.labels(info.id).set(serving.host.get(info.id).load_seconds)
    saliency_pb2_grpc.add_SaliencyServiceServicer_to_server(SaliencyServicer(serving, metrics), server.server)
    return server


async def serve(settings: SaliencySettings) -> None:
    """Load models, listen on settings.host:settings.port and serve until SIGTERM/SIGINT, then drain.

    The security settings are checked before the models load (see :func:`server_kit.grpc_server.preflight`);
    metrics are served on ``settings.metrics_port`` (0 = off).
    """
    preflight(settings, settings.host, "saliency server")
    serving = build_serving(settings)
    server = build_server(serving, settings)
    port = server.bind(settings.host, settings.port)
    await server.start()
    server.start_configured_metrics(settings.host, settings.metrics_port)
    logger.info(
        "saliency server listening on %s:%d (models: %s)",
        settings.host,
        port,
        [m.id for m in serving.host.infos()],
    )
    try:
        await server.serve_until_signalled()
    finally:
        ended = await asyncio.to_thread(serving.close, SHUTDOWN_WORKER_WAIT_S)
        await serving.cache.close()
    if not ended:
        # a computation did not reach a checkpoint in time: do not let the interpreter's exit
        # join its thread for minutes (the drain promised to end within its grace period)
        logger.warning("a computation did not stop %.0f s after the drain: exiting", SHUTDOWN_WORKER_WAIT_S)
        logging.shutdown()
        os._exit(0)
