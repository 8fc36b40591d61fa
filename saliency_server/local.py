"""The saliency service in the caller's own process: same requests, same answers, no server.

The CLI uses it when no ``--server`` is given; it loads the models itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

from saliency_server.server import build_serving
from saliency_server.settings import SaliencySettings
from seqsal.client import all_segments_request, saliency_request, verify_request
from seqsal.v1 import common_pb2, saliency_pb2


class LocalSaliencyClient:
    """Has the blocking :class:`~seqsal.client.SaliencyClient` API, served in-process."""

    def __init__(self, settings: SaliencySettings) -> None:
        self.serving = build_serving(settings)
        self.loop = asyncio.new_event_loop()

    def tokenize(self, text: str, *, as_target: bool = False, model: str = "") -> common_pb2.TokenizeResponse:
        request = common_pb2.TokenizeRequest(model=model, text=text, as_target=as_target)
        return self.loop.run_until_complete(self.serving.tokenize(request))

    def saliency(
        self, request: saliency_pb2.SaliencyRequest | None = None, **kwargs: Any
    ) -> saliency_pb2.SaliencyResponse:
        return self.loop.run_until_complete(self.serving.saliency(request or saliency_request(**kwargs)))

    def saliency_all_segments(
        self, request: saliency_pb2.SaliencyAllSegmentsRequest | None = None, **kwargs: Any
    ) -> list[saliency_pb2.SaliencyAllSegmentsResponse]:
        async def collect() -> list[saliency_pb2.SaliencyAllSegmentsResponse]:
            stream = self.serving.saliency_all_segments(request or all_segments_request(**kwargs))
            return [message async for message in stream]

        return self.loop.run_until_complete(collect())

    def verify(
        self, request: saliency_pb2.VerifyRequest | None = None, **kwargs: Any
    ) -> saliency_pb2.VerifyResponse:
        return self.loop.run_until_complete(self.serving.verify(request or verify_request(**kwargs)))

    def list_models(self) -> common_pb2.ListModelsResponse:
        return self.loop.run_until_complete(self.serving.list_models(common_pb2.ListModelsRequest()))

    def close(self) -> None:
        self.serving.close()
        self.loop.run_until_complete(self.serving.cache.close())
        self.loop.close()

    def __enter__(self) -> LocalSaliencyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
