"""The InferenceService gRPC servicer and server start-up."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc

from inference_server.backends.base import Backend
from inference_server.serving import InferenceModel, InferenceServing, model_info
from inference_server.settings import InferenceSettings
from seqsal.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from server_kit.grpc_server import GrpcServer, preflight
from server_kit.metrics import ServerMetrics
from server_kit.model_registry import ModelSpec, load_tokenizer, model_specs

logger = logging.getLogger("seqsal.inference")

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Thin gRPC adapter over :class:`InferenceServing`; :mod:`server_kit.call_lifecycle` maps errors."""

    def __init__(self, serving: InferenceServing, metrics: ServerMetrics | None = None) -> None:
        self.serving = serving
        self.metrics = metrics

    def _count(self, model: str, kind: str, count: int) -> None:
        if self.metrics is not None:
            self.metrics.count_tokens(model, kind, count)

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        response = await self.serving.generate(request)
        self._count(response.model, "prompt", len(response.prompt_token_ids))
        self._count(response.model, "generated", sum(len(c.token_ids) for c in response.candidates))
        return response

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        model = ""
        async for message in self.serving.generate_stream(request):
            if message.model:  # the first message
                model = message.model
                self._count(model, "prompt", len(message.prompt_token_ids))
            self._count(model, "generated", len(message.token_ids))
            yield message

    async def Tokenize(
        self, request: common_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.TokenizeResponse:
        return await self.serving.tokenize(request)

    async def Score(
        self, request: inference_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ScoreResponse:
        response = await self.serving.score(request)
        self._count(response.model, "prompt", len(response.prompt_token_ids))
        self._count(response.model, "target", sum(len(t.token_ids) for t in response.scores))
        return response

    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return await self.serving.list_models(request)


def make_backend(spec: ModelSpec, tokenizer: object, settings: InferenceSettings) -> Backend:
    """The backend the settings name; never a silent fallback to another one."""
    if settings.backend == "vllm":
        from inference_server.backends.vllm_backend import VllmBackend

        return VllmBackend(spec, tokenizer, settings)
    if settings.backend == "transformers":
        from inference_server.backends.transformers_backend import TransformersBackend

        return TransformersBackend(spec, tokenizer, settings)
    from inference_server.backends.openai_backend import OpenAIBackend

    return OpenAIBackend(spec, tokenizer, settings)


async def build_serving(settings: InferenceSettings) -> InferenceServing:
    """Create and start the backends of every configured model (slow: loads engines)."""
    models = []
    for i, spec in enumerate(model_specs(settings)):
        started = time.perf_counter()
        tokenizer = load_tokenizer(spec.path)
        backend = make_backend(spec, tokenizer, settings)
        await backend.start()
        load_seconds = time.perf_counter() - started
        info = model_info(spec, backend, context=backend.context, is_default=i == 0)
        logger.info(
            "inference model %s ready on %s (%s, context %d)",
            spec.id,
            backend.name,
            info.device,
            info.max_tokens,
        )
        models.append(
            InferenceModel(
                spec=spec, tokenizer=tokenizer, backend=backend, info=info, load_seconds=load_seconds
            )
        )
    return InferenceServing(models, settings)


def build_server(serving: InferenceServing, settings: InferenceSettings) -> GrpcServer:
    server = GrpcServer(settings, [SERVICE], name="inference")
    metrics = server.metrics
    inflight = serving.inflight
    metrics.watch_queue(lambda: {"running": inflight.running})
    for model in serving.models.values():
        metrics.model_load.labels(model.spec.id).set(model.load_seconds)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(
        InferenceServicer(serving, metrics), server.server
    )
    return server


async def serve(settings: InferenceSettings) -> None:
    """Start the engines, listen on settings.host:settings.port, serve until SIGTERM/SIGINT, then drain."""
    preflight(settings, settings.host, "inference server")
    serving = await build_serving(settings)
    server = build_server(serving, settings)
    port = server.bind(settings.host, settings.port)
    await server.start()
    server.start_configured_metrics(settings.host, settings.metrics_port)
    logger.info("inference server listening on %s:%d (%s)", settings.host, port, settings.backend)
    try:
        await server.serve_until_signalled()
    finally:
        await serving.close()
