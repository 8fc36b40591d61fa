"""Python clients for the seqsal services (sync and asyncio).

Each RPC is written once (:class:`_Rpc`, in ``_SaliencyRpcs`` / ``_InferenceRpcs``) and shared
by the blocking and the asyncio client of its service: a method takes the request message, or
the keyword arguments of its builder (:func:`saliency_request`, :func:`generate_request`, ...).

gRPC errors come back as the typed exceptions of :mod:`seqsal.errors`, with
the offending field when the server named one::

    with SaliencyClient("localhost:50051") as client:
        response = client.saliency(prompt="Say hi.", target=" Hi!")

A client sends a bearer token (``token=``) and connects over TLS (``tls=``)
when given them, and otherwise as the settings say (``SEQSAL_AUTH_TOKEN``,
``SEQSAL_TLS``, ``SEQSAL_TLS_CA_FILE``, ...). Every call carries an
``x-request-id`` (the ``request_id=`` of the call, or a new one; the last one
sent is ``client.last_request_id``), which the servers put on every log line
of the call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from seqsal.bearer import bearer_metadata
from seqsal.errors import ERRORS_BY_CODE, SeqsalError
from seqsal.request_ids import REQUEST_ID_KEY, new_request_id
from seqsal.retry import DEFAULT_RETRY, RetryPolicy
from seqsal.segment_scores import with_scores
from seqsal.settings import ClientSettings
from seqsal.tls import ClientTLS, aio_channel, sync_channel
from seqsal.v1 import common_pb2, inference_pb2, inference_pb2_grpc, saliency_pb2, saliency_pb2_grpc

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def _security(
    token: str | None, tls: ClientTLS | bool | None, settings: ClientSettings | None
) -> tuple[str | None, ClientTLS]:
    """The token and TLS to use: the arguments, with what they leave open taken from the settings."""
    if token is not None and tls is not None and tls is not True:
        return token or None, tls if isinstance(tls, ClientTLS) else ClientTLS(enabled=False)
    settings = settings or ClientSettings()
    if token is None:
        token = settings.auth_token.get_secret_value() if settings.auth_token else None
    if isinstance(tls, ClientTLS):
        config = tls
    elif tls is False:
        config = ClientTLS(enabled=False)
    else:  # None: as the settings say; True: TLS in any case, with the settings' files
        config = ClientTLS.from_settings(settings)
        if tls:
            config = dataclasses.replace(config, enabled=True)
    return token or None, config


class _CallMetadata:
    """Metadata common to every call of a client (token, caller's extras) plus a request id per call."""

    def __init__(self, metadata: Sequence[tuple[str, str]], token: str | None) -> None:
        self.base = tuple(metadata) + ((bearer_metadata(token),) if token else ())
        self.last_request_id: str | None = None

    def for_call(self, request_id: str | None) -> tuple[tuple[str, str], ...]:
        rid = request_id or new_request_id()
        self.last_request_id = rid
        return (*self.base, (REQUEST_ID_KEY, rid))


def channel_options(
    max_message_mb: int = 64, retry: RetryPolicy = DEFAULT_RETRY, *, retry_streams: bool = True
) -> list[tuple[str, int | str]]:
    """Options of every client channel: message sizes, load balancing, the retry policy
    (``retry_streams``: whether streams are retried too, :meth:`RetryPolicy.service_config`)."""
    size = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        # with a `dns:///name:port` target that resolves to several replicas (a headless Kubernetes
        # Service), spread calls over all of them instead of pinning one connection; a call that
        # fails with UNAVAILABLE (a replica restarting) is retried, as seqsal.retry explains
        ("grpc.lb_policy_name", "round_robin"),
        *retry.channel_options(size, retry_streams=retry_streams),
    ]


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


def teacher_forced_problem(
    *,
    prompt: str = "",
    prompt_token_ids: Sequence[int] = (),
    target: str = "",
    target_token_ids: Sequence[int] = (),
    methods: Sequence[int] = (),
    foil: str | None = None,
    granularity: int = common_pb2.GRANULARITY_UNSPECIFIED,
    custom_regex: str = "",
    ig_steps: int = 0,
    model: str = "",
    perturbation: saliency_pb2.PerturbationOptions | None = None,
) -> saliency_pb2.TeacherForcedProblem:
    """The problem every saliency request embeds: the prompt as text or as token ids (e.g. the
    ``prompt_token_ids`` Generate returned: used as given), the target as text or ids, and how to
    explain it (``perturbation``: OCCLUSION/LIME options, see :func:`perturbation_options`)."""
    problem = saliency_pb2.TeacherForcedProblem(
        model=model,
        prompt=prompt,
        prompt_token_ids=list(prompt_token_ids),
        target=target,
        target_token_ids=list(target_token_ids),
        methods=list(methods),
        granularity=granularity,  # type: ignore[arg-type]
        custom_regex=custom_regex,
        ig_steps=ig_steps,
    )
    if foil is not None:
        problem.foil = foil
    if perturbation is not None:
        problem.perturbation.CopyFrom(perturbation)
    return problem


def _the_problem(
    problem: saliency_pb2.TeacherForcedProblem | None, fields: dict[str, Any]
) -> saliency_pb2.TeacherForcedProblem:
    if problem is None:
        return teacher_forced_problem(**fields)
    if fields:
        raise TypeError(f"give the problem or its fields ({', '.join(fields)}), not both")
    return problem


def saliency_request(
    *,
    problem: saliency_pb2.TeacherForcedProblem | None = None,
    target_mask: Sequence[bool] = (),
    target_spans: Sequence[tuple[int, int]] = (),
    priority: int = saliency_pb2.PRIORITY_UNSPECIFIED,
    **problem_fields: Any,
) -> saliency_pb2.SaliencyRequest:
    """Build a SaliencyRequest: the problem (or :func:`teacher_forced_problem`'s keyword arguments)
    and which target tokens to explain (``target_mask`` or ``target_spans``; empty = all)."""
    return saliency_pb2.SaliencyRequest(
        problem=_the_problem(problem, problem_fields),
        target_mask=list(target_mask),
        target_spans=[common_pb2.CharSpan(start=s, end=e) for s, e in target_spans],
        priority=priority,  # type: ignore[arg-type]
    )


def perturbation_options(
    *, filler: str = "", samples: int = 0, seed: int = 0, ridge_alpha: float = 0.0
) -> saliency_pb2.PerturbationOptions:
    """OCCLUSION's filler, LIME's samples, seed and ridge alpha (0 = the server's defaults)."""
    return saliency_pb2.PerturbationOptions(
        filler=filler, samples=samples, seed=seed, ridge_alpha=ridge_alpha
    )


def verify_request(
    *,
    k: Sequence[int] = (),
    random_draws: int = 0,
    seed: int = 0,
    problem: saliency_pb2.SaliencyRequest | None = None,
    **problem_fields: Any,
) -> saliency_pb2.VerifyRequest:
    """Build a VerifyRequest: the problem as a SaliencyRequest, or its :func:`saliency_request`
    keyword arguments (one method, a granularity)."""
    if problem is None:
        problem = saliency_request(**problem_fields)
    elif problem_fields:
        raise TypeError("give the problem as a SaliencyRequest or as keyword arguments, not both")
    return saliency_pb2.VerifyRequest(problem=problem, k=list(k), random_draws=random_draws, seed=seed)


def all_segments_request(
    *,
    problem: saliency_pb2.TeacherForcedProblem | None = None,
    priority: int = saliency_pb2.PRIORITY_UNSPECIFIED,
    tokens_once: bool = False,
    **problem_fields: Any,
) -> saliency_pb2.SaliencyAllSegmentsRequest:
    """Build a SaliencyAllSegmentsRequest: the problem (or :func:`teacher_forced_problem`'s keyword
    arguments; a granularity is required). ``tokens_once``: tokens and segments in the first
    message only (restore the others with :class:`WholeMessages`)."""
    return saliency_pb2.SaliencyAllSegmentsRequest(
        problem=_the_problem(problem, problem_fields),
        priority=priority,  # type: ignore[arg-type]
        tokens_once=tokens_once,
    )


class WholeMessages:
    """Restores the messages of a ``tokens_once`` SaliencyAllSegments stream to whole ones.

    Call it on every message in stream order: the first message's tokens and segments are kept,
    and a later message without them gets them back, its segments' scores summed from its own
    token scores exactly as the server sums them (so the result equals a stream without
    ``tokens_once``). Messages that carry their tokens pass unchanged.
    """

    def __init__(self) -> None:
        self.tokens: list[common_pb2.Token] = []
        self.segments: list[common_pb2.Segment] = []

    def __call__(
        self, message: saliency_pb2.SaliencyAllSegmentsResponse
    ) -> saliency_pb2.SaliencyAllSegmentsResponse:
        if not message.HasField("saliency"):
            return message
        saliency = message.saliency
        if saliency.tokens:
            self.tokens, self.segments = list(saliency.tokens), list(saliency.segments)
        elif self.tokens:
            saliency.tokens.extend(self.tokens)
            saliency.segments.extend(with_scores(self.segments, [m.scores for m in saliency.scores]))
        return message


Request = TypeVar("Request", bound=Message)


class _Rpc(Generic[Request]):
    """One RPC of a service, written once for the blocking and the asyncio client.

    On a client, ``client.name(request)`` sends ``request``; ``client.name(*args, **kwargs)``
    first builds it with ``build`` (e.g. :func:`saliency_request`). ``timeout=`` (seconds;
    default: the client's) and ``request_id=`` (default: a new one) apply to every call. The
    client's ``_call`` / ``_stream`` make it blocking or asyncio.
    """

    def __init__(
        self, stub_method: str, request_type: type[Request], build: Callable[..., Request], doc: str
    ) -> None:
        self.stub_method = stub_method
        self.request_type = request_type
        self.build = build
        self.__doc__ = doc
        self.streaming = False

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def request(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Request:
        """The message to send: the one given (positionally or as ``request=``), else one built."""
        if "request" in kwargs:
            args = (kwargs.pop("request"), *args)
        if args and args[0] is None:  # client.saliency(None, prompt=...)
            args = args[1:]
        if args and isinstance(args[0], self.request_type):
            if len(args) > 1 or kwargs:
                raise TypeError(f"{self.name}() takes a request message or keyword arguments, not both")
            return args[0]
        return self.build(*args, **kwargs)

    def __get__(self, client: Any, owner: type | None = None) -> Any:
        if client is None:
            return self
        rpc = self
        send = client._stream if self.streaming else client._call

        def invoke(
            *args: Any, timeout: float | None = None, request_id: str | None = None, **kwargs: Any
        ) -> Any:
            method = getattr(client.stub, rpc.stub_method)
            return send(method, rpc.request(args, kwargs), timeout, request_id)

        invoke.__name__ = self.name
        invoke.__doc__ = self.__doc__
        return invoke


class _StreamRpc(_Rpc[Request]):
    """A server-streaming RPC: the client method returns an iterator (async iterator) of messages."""

    def __init__(
        self, stub_method: str, request_type: type[Request], build: Callable[..., Request], doc: str
    ) -> None:
        super().__init__(stub_method, request_type, build, doc)
        self.streaming = True


class _Client:
    """Channel, deadline, metadata and request ids shared by every client."""

    stub_class: Any = None
    #: Whether the channel retries server-streaming calls too (:mod:`seqsal.retry`).
    retry_streams = True

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 300.0,
        metadata: Sequence[tuple[str, str]] = (),
        channel: Any = None,
        max_message_mb: int = 64,
        token: str | None = None,
        tls: ClientTLS | bool | None = None,
        settings: ClientSettings | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        """Connect to ``target`` (``host:port``).

        Args:
            timeout: default deadline of each call, in seconds.
            metadata: extra metadata sent with every call.
            channel: an existing channel to use instead (``tls`` is then ignored).
            max_message_mb: largest message each way.
            token: bearer token; None = ``settings.auth_token``; "" = none.
            tls: a :class:`~seqsal.tls.ClientTLS`, True (TLS with the settings' files), False
                (plaintext) or None (as the settings say).
            settings: where the defaults come from; None = the environment.
            retry: how calls are retried on UNAVAILABLE and whether they wait for a server
                (:mod:`seqsal.retry`; ``RetryPolicy(wait_for_ready=True)`` rides out a restart).
        """
        token, tls_config = _security(token, tls, settings)
        options = channel_options(max_message_mb, retry, retry_streams=self.retry_streams)
        self.channel = channel or self._open(target, tls_config, options)
        self.stub = self.stub_class(self.channel)
        self.timeout = timeout
        self._metadata = _CallMetadata(metadata, token)
        self.metadata = self._metadata.base

    @staticmethod
    def _open(target: str, tls: ClientTLS, options: list[tuple[str, int | str]]) -> Any:
        raise NotImplementedError

    @property
    def last_request_id(self) -> str | None:
        """The request id of the latest call (pass ``request_id`` to tell concurrent calls apart)."""
        return self._metadata.last_request_id

    def _call_kwargs(self, timeout: float | None, request_id: str | None) -> dict[str, Any]:
        return {"timeout": timeout or self.timeout, "metadata": self._metadata.for_call(request_id)}


class _SyncClient(_Client):
    """The blocking clients: calls return messages, streams are iterators."""

    _open = staticmethod(sync_channel)
    # grpcio's sync stream never ends when the server drops it before its first message and the
    # retries fail (seqsal.retry): the caller is told at once instead
    retry_streams = False

    def _call(self, method: Any, request: Any, timeout: float | None, request_id: str | None = None) -> Any:
        kwargs = self._call_kwargs(timeout, request_id)
        try:
            return method(request, **kwargs)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def _stream(
        self, method: Any, request: Any, timeout: float | None, request_id: str | None = None
    ) -> Iterator[Any]:
        stream = method(request, **self._call_kwargs(timeout, request_id))
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            stream.cancel()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AsyncClient(_Client):
    """The asyncio clients: calls are awaited, streams are async iterators."""

    _open = staticmethod(aio_channel)

    async def _call(
        self, method: Any, request: Any, timeout: float | None, request_id: str | None = None
    ) -> Any:
        kwargs = self._call_kwargs(timeout, request_id)
        try:
            return await method(request, **kwargs)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def _stream(
        self, method: Any, request: Any, timeout: float | None, request_id: str | None = None
    ) -> AsyncIterator[Any]:
        call = method(request, **self._call_kwargs(timeout, request_id))
        try:
            async for message in call:
                yield message
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def tokenize_request(text: str, *, as_target: bool = False, model: str = "") -> common_pb2.TokenizeRequest:
    """Build a TokenizeRequest: ``text`` with the prompt's rules, or the target's with ``as_target``."""
    return common_pb2.TokenizeRequest(model=model, text=text, as_target=as_target)


def list_models_request() -> common_pb2.ListModelsRequest:
    return common_pb2.ListModelsRequest()


def request_status_request(request_id: str) -> saliency_pb2.GetRequestStatusRequest:
    """Build a GetRequestStatusRequest for the calls sent with ``request_id``."""
    return saliency_pb2.GetRequestStatusRequest(request_id=request_id)


class _CommonRpcs:
    """The RPCs both services answer."""

    tokenize = _Rpc(
        "Tokenize",
        common_pb2.TokenizeRequest,
        tokenize_request,
        "Tokenise a text exactly as the server does (prompt rules, or target rules with ``as_target``).",
    )
    list_models = _Rpc("ListModels", common_pb2.ListModelsRequest, list_models_request, "The hosted models.")


class _SaliencyRpcs(_CommonRpcs):
    stub_class = saliency_pb2_grpc.SaliencyServiceStub
    saliency = _Rpc(
        "Saliency",
        saliency_pb2.SaliencyRequest,
        saliency_request,
        "Saliency for a request, or for keyword arguments (see :func:`saliency_request`).",
    )
    saliency_all_segments = _StreamRpc(
        "SaliencyAllSegments",
        saliency_pb2.SaliencyAllSegmentsRequest,
        all_segments_request,
        "One response per target segment, as the server finishes them (see :func:`all_segments_request`;"
        " with ``tokens_once``, :class:`WholeMessages` restores them).",
    )
    verify = _Rpc(
        "Verify",
        saliency_pb2.VerifyRequest,
        verify_request,
        "The ablation test of one method's explanation (see :func:`verify_request`).",
    )
    get_request_status = _Rpc(
        "GetRequestStatus",
        saliency_pb2.GetRequestStatusRequest,
        request_status_request,
        "Where the calls sent with ``request_id`` stand in the server's queue (queued, running, paused).",
    )


class SaliencyClient(_SaliencyRpcs, _SyncClient):
    """Blocking client for SaliencyService."""


class AsyncSaliencyClient(_SaliencyRpcs, _AsyncClient):
    """asyncio client for SaliencyService."""


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
    targets: Sequence[str | Sequence[int]],
    prompt: str = "",
    prompt_token_ids: Sequence[Sequence[int]] = (),
    use_chat_template: bool = False,
    system_prompt: str = "",
    model: str = "",
) -> inference_pb2.ScoreRequest:
    """Build a ScoreRequest; each target is a text or a list of token ids. ``prompt_token_ids``:
    many prompts as ids instead of ``prompt`` (every target scored after each, one batch)."""
    return inference_pb2.ScoreRequest(
        model=model,
        prompt=prompt,
        prompt_token_ids=[inference_pb2.TokenIds(ids=list(p)) for p in prompt_token_ids],
        targets=[
            inference_pb2.ScoreTarget(text=t)
            if isinstance(t, str)
            else inference_pb2.ScoreTarget(token_ids=list(t))
            for t in targets
        ],
        use_chat_template=use_chat_template,
        system_prompt=system_prompt,
    )


class _InferenceRpcs(_CommonRpcs):
    stub_class = inference_pb2_grpc.InferenceServiceStub
    generate = _Rpc(
        "Generate",
        inference_pb2.GenerateRequest,
        generate_request,
        "Candidates for a request, or for keyword arguments (see :func:`generate_request`).",
    )
    generate_stream = _StreamRpc(
        "GenerateStream",
        inference_pb2.GenerateRequest,
        generate_request,
        "The candidates as they are generated, one piece per message.",
    )
    score = _Rpc(
        "Score",
        inference_pb2.ScoreRequest,
        score_request,
        "Teacher-forced log-probs of targets (see :func:`score_request`).",
    )


class InferenceClient(_InferenceRpcs, _SyncClient):
    """Blocking client for InferenceService."""


class AsyncInferenceClient(_InferenceRpcs, _AsyncClient):
    """asyncio client for InferenceService."""
