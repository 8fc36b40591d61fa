"""Python clients for the seqsal services (sync and asyncio).

gRPC errors come back as the typed exceptions of :mod:`seqsal.errors`, with
the offending field when the server named one::

    with SaliencyClient("localhost:50051") as client:
        response = client.saliency(prompt="Say hi.", target=" Hi!")
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from seqsal.errors import ERRORS_BY_CODE, SeqsalError
from seqsal.v1 import common_pb2, inference_pb2, inference_pb2_grpc, saliency_pb2, saliency_pb2_grpc

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def channel_options(max_message_mb: int = 64) -> list[tuple[str, int]]:
    size = max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


def error_from_rpc(exc: grpc.RpcError) -> SeqsalError:
    """The typed exception for a failed call, with the field named in its BadRequest detail."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = exc.details() if hasattr(exc, "details") else str(exc)
    field = None
    metadata = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in metadata or ():
        if key == _STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                bad_request = error_details_pb2.BadRequest()
                if detail.Unpack(bad_request) and bad_request.field_violations:
                    field = bad_request.field_violations[0].field
    cls = ERRORS_BY_CODE.get(code, SeqsalError)
    error = cls(message or code.name, field=field)
    error.code = code
    return error


def saliency_request(
    *,
    prompt: str,
    target: str = "",
    target_token_ids: Sequence[int] = (),
    target_mask: Sequence[bool] = (),
    target_spans: Sequence[tuple[int, int]] = (),
    methods: Sequence[int] = (),
    foil: str | None = None,
    granularity: int = common_pb2.GRANULARITY_UNSPECIFIED,
    custom_regex: str = "",
    ig_steps: int = 0,
    model: str = "",
) -> saliency_pb2.SaliencyRequest:
    """Build a SaliencyRequest from keyword arguments."""
    request = saliency_pb2.SaliencyRequest(
        model=model,
        prompt=prompt,
        target=target,
        target_token_ids=list(target_token_ids),
        target_mask=list(target_mask),
        target_spans=[common_pb2.CharSpan(start=s, end=e) for s, e in target_spans],
        methods=list(methods),
        granularity=granularity,
        custom_regex=custom_regex,
        ig_steps=ig_steps,
    )
    if foil is not None:
        request.foil = foil
    return request


def all_segments_request(
    *,
    prompt: str,
    granularity: int,
    target: str = "",
    target_token_ids: Sequence[int] = (),
    methods: Sequence[int] = (),
    foil: str | None = None,
    custom_regex: str = "",
    ig_steps: int = 0,
    model: str = "",
) -> saliency_pb2.SaliencyAllSegmentsRequest:
    """Build a SaliencyAllSegmentsRequest from keyword arguments."""
    request = saliency_pb2.SaliencyAllSegmentsRequest(
        model=model,
        prompt=prompt,
        target=target,
        target_token_ids=list(target_token_ids),
        methods=list(methods),
        granularity=granularity,
        custom_regex=custom_regex,
        ig_steps=ig_steps,
    )
    if foil is not None:
        request.foil = foil
    return request


class _SyncClient:
    """Channel, deadline, metadata and error mapping shared by the blocking clients."""

    stub_class: Any = None

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 300.0,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.Channel | None = None,
        max_message_mb: int = 64,
    ) -> None:
        self.channel = channel or grpc.insecure_channel(target, options=channel_options(max_message_mb))
        self.stub = self.stub_class(self.channel)
        self.timeout = timeout
        self.metadata = tuple(metadata)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def _stream(self, method: Any, request: Any, timeout: float | None) -> Iterator[Any]:
        stream = method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            stream.cancel()

    def tokenize(self, text: str, *, as_target: bool = False, model: str = "") -> common_pb2.TokenizeResponse:
        """Tokenise a text exactly as the server does (prompt rules, or target rules with ``as_target``)."""
        request = common_pb2.TokenizeRequest(model=model, text=text, as_target=as_target)
        return self._call(self.stub.Tokenize, request, None)

    def list_models(self) -> common_pb2.ListModelsResponse:
        return self._call(self.stub.ListModels, common_pb2.ListModelsRequest(), None)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AsyncClient:
    """Channel, deadline, metadata and error mapping shared by the asyncio clients."""

    stub_class: Any = None

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 300.0,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.aio.Channel | None = None,
        max_message_mb: int = 64,
    ) -> None:
        self.channel = channel or grpc.aio.insecure_channel(target, options=channel_options(max_message_mb))
        self.stub = self.stub_class(self.channel)
        self.timeout = timeout
        self.metadata = tuple(metadata)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def _stream(self, method: Any, request: Any, timeout: float | None) -> AsyncIterator[Any]:
        call = method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    async def tokenize(
        self, text: str, *, as_target: bool = False, model: str = ""
    ) -> common_pb2.TokenizeResponse:
        request = common_pb2.TokenizeRequest(model=model, text=text, as_target=as_target)
        return await self._call(self.stub.Tokenize, request, None)

    async def list_models(self) -> common_pb2.ListModelsResponse:
        return await self._call(self.stub.ListModels, common_pb2.ListModelsRequest(), None)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SaliencyClient(_SyncClient):
    """Blocking client for SaliencyService."""

    stub_class = saliency_pb2_grpc.SaliencyServiceStub

    def saliency(
        self,
        request: saliency_pb2.SaliencyRequest | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> saliency_pb2.SaliencyResponse:
        """Saliency for a request, or for keyword arguments (see :func:`saliency_request`)."""
        return self._call(self.stub.Saliency, request or saliency_request(**kwargs), timeout)

    def saliency_all_segments(
        self,
        request: saliency_pb2.SaliencyAllSegmentsRequest | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Iterator[saliency_pb2.SaliencyAllSegmentsResponse]:
        """One response per target segment, as the server finishes them."""
        return self._stream(self.stub.SaliencyAllSegments, request or all_segments_request(**kwargs), timeout)


class AsyncSaliencyClient(_AsyncClient):
    """asyncio client for SaliencyService."""

    stub_class = saliency_pb2_grpc.SaliencyServiceStub

    async def saliency(
        self,
        request: saliency_pb2.SaliencyRequest | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> saliency_pb2.SaliencyResponse:
        return await self._call(self.stub.Saliency, request or saliency_request(**kwargs), timeout)

    def saliency_all_segments(
        self,
        request: saliency_pb2.SaliencyAllSegmentsRequest | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[saliency_pb2.SaliencyAllSegmentsResponse]:
        return self._stream(self.stub.SaliencyAllSegments, request or all_segments_request(**kwargs), timeout)


def generate_request(
    *,
    prompt: str,
    n: int = 1,
    max_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    use_chat_template: bool = False,
    system_prompt: str = "",
    model: str = "",
) -> inference_pb2.GenerateRequest:
    """Build a GenerateRequest from keyword arguments (0 = the server's default for numbers)."""
    request = inference_pb2.GenerateRequest(
        model=model,
        prompt=prompt,
        n=n,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=list(stop),
        use_chat_template=use_chat_template,
        system_prompt=system_prompt,
    )
    if seed is not None:
        request.seed = seed
    return request


def score_request(
    *,
    prompt: str,
    targets: Sequence[str | Sequence[int]],
    use_chat_template: bool = False,
    system_prompt: str = "",
    model: str = "",
) -> inference_pb2.ScoreRequest:
    """Build a ScoreRequest; each target is a text or a list of token ids."""
    return inference_pb2.ScoreRequest(
        model=model,
        prompt=prompt,
        targets=[
            inference_pb2.ScoreTarget(text=t)
            if isinstance(t, str)
            else inference_pb2.ScoreTarget(token_ids=list(t))
            for t in targets
        ],
        use_chat_template=use_chat_template,
        system_prompt=system_prompt,
    )


class InferenceClient(_SyncClient):
    """Blocking client for InferenceService."""

    stub_class = inference_pb2_grpc.InferenceServiceStub

    def generate(
        self,
        request: inference_pb2.GenerateRequest | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> inference_pb2.GenerateResponse:
        """Candidates for a request, or for keyword arguments (see :func:`generate_request`)."""
        return self._call(self.stub.Generate, request or generate_request(**kwargs), timeout)

    def generate_stream(
        self,
        request: inference_pb2.GenerateRequest | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Iterator[inference_pb2.GenerateStreamResponse]:
        """The candidates as they are generated, one piece per message."""
        return self._stream(self.stub.GenerateStream, request or generate_request(**kwargs), timeout)

    def score(
        self,
        request: inference_pb2.ScoreRequest | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> inference_pb2.ScoreResponse:
        """Teacher-forced log-probs of targets (see :func:`score_request`)."""
        return self._call(self.stub.Score, request or score_request(**kwargs), timeout)


class AsyncInferenceClient(_AsyncClient):
    """asyncio client for InferenceService."""

    stub_class = inference_pb2_grpc.InferenceServiceStub

    async def generate(
        self,
        request: inference_pb2.GenerateRequest | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> inference_pb2.GenerateResponse:
        return await self._call(self.stub.Generate, request or generate_request(**kwargs), timeout)

    def generate_stream(
        self,
        request: inference_pb2.GenerateRequest | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        return self._stream(self.stub.GenerateStream, request or generate_request(**kwargs), timeout)

    async def score(
        self,
        request: inference_pb2.ScoreRequest | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> inference_pb2.ScoreResponse:
        return await self._call(self.stub.Score, request or score_request(**kwargs), timeout)
