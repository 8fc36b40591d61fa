"""The InferenceService gRPC servicer and server start-up."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from inference_server.backends.base import Backend
from inference_server.serving import InferenceModel, InferenceServing, model_info
from seqsal.grpc_server import GrpcServer
from seqsal.model_registry import ModelSpec, load_tokenizer, model_specs
from seqsal.settings import Settings
from seqsal.v1 import common_pb2, inference_pb2, inference_pb2_grpc

logger = logging.getLogger("seqsal.inference")

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Thin gRPC adapter over :class:`InferenceServing`; errors are mapped by the interceptor."""

    def __init__(self, serving: InferenceServing) -> None:
        self.serving = serving

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        return await self.serving.generate(request)

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        async for message in self.serving.generate_stream(request):
            yield message

    async def Tokenize(
        self, request: common_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.TokenizeResponse:
        return await self.serving.tokenize(request)

    async def Score(
        self, request: inference_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ScoreResponse:
        return await self.serving.score(request)

    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return await self.serving.list_models(request)


def make_backend(spec: ModelSpec, tokenizer: object, settings: Settings) -> Backend:
    """The backend the settings name; never a silent fallback to another one."""
    if settings.backend == "vllm":
        from inference_server.backends.vllm_backend import VllmBackend

        return VllmBackend(spec, tokenizer, settings)
    if settings.backend == "transformers":
        from inference_server.backends.transformers_backend import TransformersBackend

        return TransformersBackend(spec, tokenizer, settings)
    from inference_server.backends.openai_backend import OpenAIBackend

    return OpenAIBackend(spec, tokenizer, settings)


async def build_serving(settings: Settings) -> InferenceServing:
    """Create and start the backends of every configured model (slow: loads engines)."""
    models = []
    for i, spec in enumerate(model_specs(settings)):
        tokenizer = load_tokenizer(spec.path)
        backend = make_backend(spec, tokenizer, settings)
        await backend.start()
        info = model_info(spec, backend, context=backend.context, is_default=i == 0)
        logger.info(
            "inference model %s ready on %s (%s, context %d)",
            spec.id,
            backend.name,
            info.device,
            info.max_tokens,
        )
        models.append(InferenceModel(spec=spec, tokenizer=tokenizer, backend=backend, info=info))
    return InferenceServing(models, settings)


def build_server(serving: InferenceServing, settings: Settings) -> GrpcServer:
    server = GrpcServer(settings, [SERVICE])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(serving), server.server)
    return server


async def serve(settings: Settings) -> None:
    """Start the engines, listen on inference_host:inference_port, serve until SIGTERM/SIGINT, then drain."""
    serving = await build_serving(settings)
    server = build_server(serving, settings)
    port = server.bind(settings.inference_host, settings.inference_port)
    await server.start()
    logger.info("inference server listening on %s:%d (%s)", settings.inference_host, port, settings.backend)
    try:
        await server.serve_until_signalled()
    finally:
        await serving.close()
