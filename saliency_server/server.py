"""The SaliencyService gRPC servicer and server start-up."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from saliency_server.model_host import ModelHost
from saliency_server.serving import SaliencyServing
from seqsal.cache import make_cache
from seqsal.grpc_server import GrpcServer
from seqsal.model_registry import model_specs
from seqsal.settings import Settings
from seqsal.v1 import common_pb2, saliency_pb2, saliency_pb2_grpc

logger = logging.getLogger("seqsal.saliency")

SERVICE = saliency_pb2.DESCRIPTOR.services_by_name["SaliencyService"]


class SaliencyServicer(saliency_pb2_grpc.SaliencyServiceServicer):
    """Thin gRPC adapter over :class:`SaliencyServing`; errors are mapped by the interceptor."""

    def __init__(self, serving: SaliencyServing) -> None:
        self.serving = serving

    async def Tokenize(
        self, request: common_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.TokenizeResponse:
        return await self.serving.tokenize(request)

    async def Saliency(
        self, request: saliency_pb2.SaliencyRequest, context: grpc.aio.ServicerContext
    ) -> saliency_pb2.SaliencyResponse:
        return await self.serving.saliency(request)

    async def SaliencyAllSegments(
        self, request: saliency_pb2.SaliencyAllSegmentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[saliency_pb2.SaliencyAllSegmentsResponse]:
        async for message in self.serving.saliency_all_segments(request):
            yield message

    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return await self.serving.list_models(request)


def build_serving(settings: Settings) -> SaliencyServing:
    """Load the configured models and cache (slow: loads weights)."""
    host = ModelHost.load(model_specs(settings), settings)
    return SaliencyServing(host, make_cache(settings), settings)


def build_server(serving: SaliencyServing, settings: Settings) -> GrpcServer:
    """A ready-to-start server for ``serving`` (health and reflection included)."""
    server = GrpcServer(settings, [SERVICE])
    saliency_pb2_grpc.add_SaliencyServiceServicer_to_server(SaliencyServicer(serving), server.server)
    return server


async def serve(settings: Settings, *, ready: object = None) -> None:
    """Load models, listen on settings.host:settings.port and serve until SIGTERM/SIGINT, then drain."""
    serving = build_serving(settings)
    server = build_server(serving, settings)
    port = server.bind(settings.host, settings.port)
    await server.start()
    logger.info(
        "saliency server listening on %s:%d (models: %s)",
        settings.host,
        port,
        [m.id for m in serving.host.infos()],
    )
    try:
        await server.serve_until_signalled()
    finally:
        serving.close()
        await serving.cache.close()
