"""End-to-end tests of the saliency gRPC server: real servers on free ports, real tiny models.

A module-scoped server hosts two tiny random models (Llama as the default ``tiny``, GPT-2 as
``gpt2``); tests that slow down or count the engine, or need other settings (queue bounds,
token limits, message sizes), start their own server. The engine is observed by replacing
``GradientEngine.saliency_batch`` on the hosted instance with :class:`EngineSpy`, which runs
in the worker thread exactly where the real method would.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from health_probe import HealthProbe

from saliency_server.cache import InMemoryCache
from saliency_server.engine import CancelCheck, GradientEngine, SaliencyInputs, SaliencyResult, Steps
from saliency_server.settings import SaliencySettings
from seqsal.client import AsyncSaliencyClient, error_from_rpc
from seqsal.errors import (
    MAX_MESSAGE_BYTES,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SeqsalError,
)
from seqsal.v1 import common_pb2, saliency_pb2
from server_kit.grpc_server import server_options

if TYPE_CHECKING:
    from conftest import RunningSaliencyServer, SaliencyServerFactory

pytestmark = pytest.mark.asyncio(loop_scope="session")

SERVICE_NAME = "seqsal.v1.SaliencyService"
DEFAULT_METHODS = [common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT]
ALL_METHODS = [common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT, common_pb2.INTEGRATED_GRADIENTS]
PROMPT = "Question: What is the capital of France?\nAnswer:"
TARGET = " Paris is the capital. It is big."

TokenTuple = tuple[int, str, int, int, bool, int]


def make_settings(models: Sequence[str], **overrides: Any) -> SaliencySettings:
    """SaliencySettings for a test server: CPU, float32, in-process cache, no .env, no Redis from the env."""
    values: dict[str, Any] = {
        "models": list(models),
        "port": 0,
        "device": "cpu",
        "dtype": "float32",
        "redis_url": None,
        "cache_max_mb": 64,
        "max_queue": 16,
        "max_concurrency": 1,
    }
    values.update(overrides)
    return SaliencySettings(_env_file=None, **values)  # type: ignore[call-arg]


def token_tuple(token: common_pb2.Token) -> TokenTuple:
    return (token.id, token.text, token.start, token.end, token.special, token.part)


def scores_of(response: saliency_pb2.SaliencyResponse) -> dict[int, np.ndarray]:
    return {s.method: np.asarray(s.scores, dtype=np.float32) for s in response.scores}


def assert_same_scores(a: saliency_pb2.SaliencyResponse, b: saliency_pb2.SaliencyResponse) -> None:
    """Exactly equal scores for the methods both responses have."""
    sa, sb = scores_of(a), scores_of(b)
    for method in set(sa) & set(sb):
        np.testing.assert_array_equal(sa[method], sb[method], err_msg=common_pb2.Method.Name(method))


def assert_close_scores(
    a: saliency_pb2.SaliencyResponse, b: saliency_pb2.SaliencyResponse, *, rtol: float = 1e-4
) -> None:
    sa, sb = scores_of(a), scores_of(b)
    assert set(sa) == set(sb)
    for method, values in sa.items():
        scale = float(np.abs(values).max()) or 1.0
        np.testing.assert_allclose(
            values, sb[method], rtol=rtol, atol=rtol * scale, err_msg=common_pb2.Method.Name(method)
        )


def target_range(response: saliency_pb2.SaliencyResponse) -> range:
    parts = [t.part for t in response.tokens]
    first = parts.index(common_pb2.TARGET)
    return range(first, first + parts.count(common_pb2.TARGET))


class EngineSpy:
    """Replaces ``engine.saliency_batch``: counts calls, records masks and cancel checks, can stall.

    The stall runs in the worker thread (where the engine is called) and ends early as soon
    as the server's ``cancelled`` callable says so; the real engine then runs (and, when
    cancelled, raises at its first checkpoint).
    """

    def __init__(self, engine: GradientEngine, delay_s: float = 0.0) -> None:
        self.real = engine.saliency_batch
        self.delay_s = delay_s
        self.calls = 0
        self.masks: list[np.ndarray] = []
        self.cancel_checks: list[CancelCheck] = []
        self.saw_cancel = threading.Event()
        self.started = threading.Event()
        self._lock = threading.Lock()

    def __call__(
        self,
        inputs: SaliencyInputs,
        masks: np.ndarray,
        methods: Sequence[int],
        *,
        ig_steps: int = 16,
        cancelled: CancelCheck | None = None,
        steps: Steps | None = None,
    ) -> Iterator[SaliencyResult]:
        with self._lock:
            self.calls += 1
            self.masks.append(np.array(masks, dtype=bool))
            if cancelled is not None:
                self.cancel_checks.append(cancelled)
        self.started.set()
        deadline = time.monotonic() + self.delay_s
        while time.monotonic() < deadline:
            if cancelled is not None and cancelled():
                self.saw_cancel.set()
                break
            time.sleep(0.01)
        return self.real(inputs, masks, methods, ig_steps=ig_steps, cancelled=cancelled, steps=steps)


def install_spy(
    monkeypatch: pytest.MonkeyPatch, srv: RunningSaliencyServer, delay_s: float = 0.0, model: str = ""
) -> EngineSpy:
    engine = srv.serving.host.get(model).engine
    spy = EngineSpy(engine, delay_s)
    monkeypatch.setattr(engine, "saliency_batch", spy)
    return spy


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [message async for message in stream]


def memory_cache(srv: RunningSaliencyServer) -> InMemoryCache:
    cache = srv.serving.cache
    assert isinstance(cache, InMemoryCache)
    return cache


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_spec(tiny_model_dirs: dict[str, Path]) -> str:
    return f"tiny={tiny_model_dirs['llama']}"


@pytest.fixture(scope="module")
def model_specs(tiny_model_dirs: dict[str, Path], llama_spec: str) -> list[str]:
    return [llama_spec, f"gpt2={tiny_model_dirs['gpt2']}"]


@pytest.fixture(scope="module")
async def srv(
    run_saliency_server: SaliencyServerFactory, model_specs: list[str]
) -> AsyncIterator[RunningSaliencyServer]:
    async with run_saliency_server(make_settings(model_specs)) as running:
        yield running


@pytest.fixture(scope="module")
async def client(srv: RunningSaliencyServer) -> AsyncIterator[AsyncSaliencyClient]:
    async with AsyncSaliencyClient(srv.address, timeout=60.0) as c:
        yield c


async def still_serves(client: AsyncSaliencyClient) -> None:
    """The server answers a real Saliency call (cached after the first time)."""
    response = await client.saliency(prompt="Still there?", target=" Yes.")
    assert len(response.scores) == 2 and len(response.tokens) > 2


# --- health, reflection, models, tokenize -----------------------------------------------------------


async def test_health_reports_serving(srv: RunningSaliencyServer) -> None:
    async with grpc.aio.insecure_channel(srv.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_service_and_serves_its_descriptor(srv: RunningSaliencyServer) -> None:
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="seqsal.v1.NoSuchThing"),
    ]
    async with grpc.aio.insecure_channel(srv.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = [r async for r in stub.ServerReflectionInfo(iter(requests), timeout=10)]
    assert len(responses) == 3
    listed = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= listed

    files = {}
    for blob in responses[1].file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
        files[proto.name] = proto
    saliency_file = files["seqsal/v1/saliency.proto"]
    assert saliency_file.package == "seqsal.v1"
    assert "seqsal/v1/common.proto" in saliency_file.dependency
    (service,) = [s for s in saliency_file.service if s.name == "SaliencyService"]
    methods = {m.name: m for m in service.method}
    assert set(methods) == {
        "Tokenize",
        "Saliency",
        "SaliencyAllSegments",
        "Verify",
        "ListModels",
        "GetRequestStatus",
    }
    assert methods["SaliencyAllSegments"].server_streaming
    assert methods["Saliency"].input_type == ".seqsal.v1.SaliencyRequest"
    assert responses[2].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_list_models(client: AsyncSaliencyClient) -> None:
    models = (await client.list_models()).models
    assert [m.id for m in models] == ["tiny", "gpt2"]
    assert [m.is_default for m in models] == [True, False]
    assert [m.architecture for m in models] == ["LlamaForCausalLM", "GPT2LMHeadModel"]
    for info in models:
        assert info.revision and info.dtype == "float32" and info.device == "cpu"
        assert info.max_tokens == 1024  # min(settings.max_tokens=4096, the models' context of 1024)
    assert models[0].revision != models[1].revision


@pytest.mark.parametrize("model", ["", "tiny", "gpt2"])
async def test_tokenize_tiles_text_and_as_target_has_no_bos(client: AsyncSaliencyClient, model: str) -> None:
    text = "Hello world.  How are you?\nFine, thanks — café!"
    prompt = await client.tokenize(text, model=model)
    target = await client.tokenize(text, as_target=True, model=model)
    assert prompt.model == target.model == (model or "tiny")
    for response, part in ((prompt, common_pb2.PROMPT), (target, common_pb2.TARGET)):
        regular = [t for t in response.tokens if not t.special]
        assert "".join(t.text for t in regular) == text
        cursor = 0
        for token in regular:
            # byte-fallback pieces of one character: all but the last are empty
            assert token.start == cursor and token.end >= token.start
            assert text[token.start : token.end] == token.text
            cursor = token.end
        assert cursor == len(text)
        assert all(t.part == part for t in response.tokens)
    assert not any(t.special for t in target.tokens)
    if (model or "tiny") == "tiny":  # Llama's tokenizer adds <s> in front of a prompt
        bos = prompt.tokens[0]
        assert (bos.special, bos.text, bos.start, bos.end) == (True, "<s>", 0, 0)
        assert sum(t.special for t in prompt.tokens) == 1
    else:  # GPT-2 adds nothing
        assert not any(t.special for t in prompt.tokens)


async def test_tokenize_unknown_model_is_not_found(client: AsyncSaliencyClient) -> None:
    with pytest.raises(NotFoundError) as info:
        await client.tokenize("hi", model="nope")
    assert info.value.field == "model" and "nope" in info.value.message


# --- Saliency --------------------------------------------------------------------------------------


async def test_saliency_response_covers_every_token_in_order(client: AsyncSaliencyClient) -> None:
    prompt = "Response shape: " + PROMPT
    response = await client.saliency(prompt=prompt, target=TARGET)
    prompt_tokens = (await client.tokenize(prompt)).tokens
    target_tokens = (await client.tokenize(TARGET, as_target=True)).tokens
    assert [token_tuple(t) for t in response.tokens] == [token_tuple(t) for t in prompt_tokens] + [
        token_tuple(t) for t in target_tokens
    ]
    n_prompt, n_target = len(prompt_tokens), len(target_tokens)
    assert [m.method for m in response.scores] == DEFAULT_METHODS
    for method_scores in response.scores:
        assert len(method_scores.scores) == n_prompt + n_target
        assert all(math.isfinite(v) for v in method_scores.scores)
        assert not method_scores.HasField("completeness_residual") and method_scores.ig_steps == 0
        # the last target token is never an input to the objective: exactly 0
        assert method_scores.scores[-1] == 0.0
        assert any(v != 0.0 for v in method_scores.scores[:n_prompt])
    assert min(response.scores[0].scores) >= 0.0  # GRAD_L2 is a norm
    assert list(response.target_mask) == [True] * n_target
    assert len(response.target_token_logprobs) == n_target
    assert all(lp <= 0.0 for lp in response.target_token_logprobs)
    assert response.target_logprob == pytest.approx(sum(response.target_token_logprobs), abs=1e-4)
    assert not response.HasField("foil_logprob")
    info = (await client.list_models()).models[0]
    assert (response.model, response.revision, response.dtype, response.device) == (
        "tiny",
        info.revision,
        "float32",
        "cpu",
    )
    assert response.granularity == common_pb2.GRANULARITY_UNSPECIFIED and not response.segments
    assert not response.cache_hit and response.server_time_ms > 0


async def test_methods_come_back_in_request_order(client: AsyncSaliencyClient) -> None:
    order = [common_pb2.INTEGRATED_GRADIENTS, common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT]
    response = await client.saliency(prompt="Order: " + PROMPT, target=TARGET, methods=order, ig_steps=4)
    assert [m.method for m in response.scores] == order
    single = await client.saliency(
        prompt="Order: " + PROMPT, target=TARGET, methods=[common_pb2.GRAD_DOT_INPUT]
    )
    assert [m.method for m in single.scores] == [common_pb2.GRAD_DOT_INPUT]


async def test_second_identical_call_is_a_cache_hit(client: AsyncSaliencyClient) -> None:
    kwargs: dict[str, Any] = {
        "prompt": "Repeat: " + PROMPT,
        "target": TARGET,
        "granularity": common_pb2.WORDS,
    }
    first = await client.saliency(**kwargs)
    second = await client.saliency(**kwargs)
    assert not first.cache_hit and second.cache_hit
    assert_same_scores(first, second)
    assert [token_tuple(t) for t in first.tokens] == [token_tuple(t) for t in second.tokens]
    assert list(first.target_token_logprobs) == list(second.target_token_logprobs)
    assert first.target_logprob == second.target_logprob
    assert list(first.segments) == list(second.segments)


async def test_subset_of_methods_hits_the_cache_of_a_superset(client: AsyncSaliencyClient) -> None:
    kwargs: dict[str, Any] = {"prompt": "Superset: " + PROMPT, "target": TARGET, "ig_steps": 6}
    full = await client.saliency(**kwargs, methods=ALL_METHODS)
    assert not full.cache_hit
    for subset in (
        [common_pb2.GRAD_DOT_INPUT],
        [common_pb2.INTEGRATED_GRADIENTS, common_pb2.GRAD_L2],
        [common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT],
    ):
        part = await client.saliency(**kwargs, methods=subset)
        assert part.cache_hit, subset
        assert [m.method for m in part.scores] == subset
        assert_same_scores(full, part)
    ig_full = next(m for m in full.scores if m.method == common_pb2.INTEGRATED_GRADIENTS)
    again = await client.saliency(**kwargs, methods=[common_pb2.INTEGRATED_GRADIENTS])
    assert again.cache_hit
    assert again.scores[0].ig_steps == ig_full.ig_steps == 6
    assert again.scores[0].completeness_residual == ig_full.completeness_residual
    # IG with other steps is another computation; the gradient methods ignore ig_steps
    other_steps = await client.saliency(**dict(kwargs, ig_steps=3), methods=[common_pb2.INTEGRATED_GRADIENTS])
    assert not other_steps.cache_hit and other_steps.scores[0].ig_steps == 3
    grads = await client.saliency(**dict(kwargs, ig_steps=3), methods=[common_pb2.GRAD_L2])
    assert grads.cache_hit


async def test_segments_sum_token_scores_and_tile_the_sequence(client: AsyncSaliencyClient) -> None:
    prompt = "Segments. " + PROMPT + "\n\nNew paragraph here."
    for granularity in (common_pb2.TOKENS, common_pb2.WORDS, common_pb2.SENTENCES, common_pb2.LINES):
        response = await client.saliency(prompt=prompt, target=TARGET, granularity=granularity)
        assert response.granularity == granularity
        scores = [np.asarray(m.scores, dtype=np.float64) for m in response.scores]
        cursor = 0
        for segment in response.segments:
            assert segment.token_start == cursor and segment.token_end > segment.token_start
            tokens = response.tokens[segment.token_start : segment.token_end]
            assert {t.part for t in tokens} == {segment.part}
            assert segment.text == "".join(t.text for t in tokens)
            assert len(segment.scores) == len(scores)
            for value, method_scores in zip(segment.scores, scores, strict=True):
                expected = method_scores[segment.token_start : segment.token_end].sum()
                assert value == pytest.approx(expected, rel=1e-5, abs=1e-5)
            cursor = segment.token_end
        assert cursor == len(response.tokens)
        if granularity == common_pb2.TOKENS:
            assert len(response.segments) == len(response.tokens)


async def test_custom_regex_segments(client: AsyncSaliencyClient) -> None:
    response = await client.saliency(
        prompt="a, b, c and d", target=" e, f", granularity=common_pb2.CUSTOM_REGEX, custom_regex=","
    )
    assert response.granularity == common_pb2.CUSTOM_REGEX
    prompt_segments = [s.text for s in response.segments if s.part == common_pb2.PROMPT]
    assert "".join(prompt_segments).endswith("a, b, c and d")
    assert len(prompt_segments) >= 3


# n 'a' then 'b': Python's re backtracks 2**n times on these (the server freeze); RE2 is linear.
CATASTROPHIC_PROMPT = "a" * 900 + "b"
CATASTROPHIC_REGEXES = [r"(a+)+$", r"(a|aa)+$", r"(a|a)+$"]


@pytest.mark.parametrize("pattern", CATASTROPHIC_REGEXES)
async def test_catastrophic_regex_answers_and_health_keeps_answering(
    srv: RunningSaliencyServer, client: AsyncSaliencyClient, pattern: str
) -> None:
    regex = {"granularity": common_pb2.CUSTOM_REGEX, "custom_regex": pattern}
    async with HealthProbe(srv.address) as probe:
        single = await client.saliency(prompt=CATASTROPHIC_PROMPT, target=" x", **regex)
        streamed = await collect(
            client.saliency_all_segments(prompt=CATASTROPHIC_PROMPT, target=" x", **regex)
        )
    assert probe.answers >= 2 and not probe.failures
    print(
        f"\n[regex] {pattern} on {len(CATASTROPHIC_PROMPT)} chars: answered; {probe.answers} health answers"
    )
    prompt_text = "".join(s.text for s in single.segments if s.part == common_pb2.PROMPT)
    assert prompt_text.endswith(CATASTROPHIC_PROMPT)
    assert len(streamed) == streamed[0].segment_count == 1
    assert streamed[0].target_segment.text == " x"


@pytest.mark.parametrize(
    ("pattern", "fragments"),
    [
        (r"(a)\1", ("RE2", "backreferences")),
        (r"(?<=a)b", ("RE2", "lookaround")),
        (r"x*", ("empty string", "TOKENS")),
        (r"\B", ("empty string inside words", "\\b")),
        ("", ("required", "CUSTOM_REGEX")),
    ],
)
async def test_unsupported_regex_is_invalid_argument_with_the_syntax(
    client: AsyncSaliencyClient, pattern: str, fragments: tuple[str, ...]
) -> None:
    regex = {"granularity": common_pb2.CUSTOM_REGEX, "custom_regex": pattern}
    for call in (
        client.saliency(prompt=PROMPT, target=TARGET, **regex),
        collect(client.saliency_all_segments(prompt=PROMPT, target=TARGET, **regex)),
    ):
        with pytest.raises(InvalidArgumentError) as info:
            await call
        assert info.value.field == "custom_regex" and "custom_regex" in info.value.message
        for fragment in fragments:
            assert fragment in info.value.message, info.value.message


async def test_an_echoed_huge_value_keeps_the_status_intact(client: AsyncSaliencyClient) -> None:
    """Status messages travel in headers: a 1 MB model name once came back as RESOURCE_EXHAUSTED."""
    for name in ("x" * 1_000_000, "😀" * 300_000):
        with pytest.raises(NotFoundError) as info:
            await client.tokenize("Hi", model=name)
        assert info.value.field == "model" and f"({len(name)} chars)" in info.value.message
    regex = "(?:é😀)" * 100 + "("  # within the length limit, 4-byte chars, invalid
    with pytest.raises(InvalidArgumentError) as bad:
        await client.saliency(
            prompt=PROMPT, target=TARGET, granularity=common_pb2.CUSTOM_REGEX, custom_regex=regex
        )
    assert bad.value.field == "custom_regex" and "RE2" in bad.value.message
    assert len(bad.value.message.encode()) <= MAX_MESSAGE_BYTES


async def test_target_mask_is_echoed_and_limits_the_scores(client: AsyncSaliencyClient) -> None:
    n_target = len((await client.tokenize(TARGET, as_target=True)).tokens)
    assert n_target >= 4
    mask = [False] * n_target
    mask[1] = True
    mask[2] = True
    response = await client.saliency(prompt="Mask: " + PROMPT, target=TARGET, target_mask=mask)
    assert list(response.target_mask) == mask
    selected = np.asarray(response.target_token_logprobs, dtype=np.float64)[np.asarray(mask)]
    assert response.target_logprob == pytest.approx(selected.sum(), abs=1e-4)
    last_selected = target_range(response)[2]
    for method_scores in response.scores:
        assert all(v == 0.0 for v in method_scores.scores[last_selected:])
        assert any(v != 0.0 for v in method_scores.scores[:last_selected])
    full = await client.saliency(prompt="Mask: " + PROMPT, target=TARGET)
    assert not full.cache_hit  # another selection is another cache entry
    assert list(full.target_token_logprobs) == pytest.approx(list(response.target_token_logprobs), abs=1e-5)


async def test_target_spans_select_overlapping_tokens(client: AsyncSaliencyClient) -> None:
    target_tokens = (await client.tokenize(TARGET, as_target=True)).tokens
    spans = [(2, 4), (len(TARGET) - 3, len(TARGET) - 1)]
    expected = [any(t.start < end and t.end > start for start, end in spans) for t in target_tokens]
    assert 1 <= sum(expected) < len(expected)
    prompt = "Spans: " + PROMPT
    by_spans = await client.saliency(prompt=prompt, target=TARGET, target_spans=spans)
    assert list(by_spans.target_mask) == expected
    by_mask = await client.saliency(prompt=prompt, target=TARGET, target_mask=expected)
    assert by_mask.cache_hit  # the same selection, so the same cache entries
    assert_same_scores(by_spans, by_mask)
    # a span inside one token selects exactly that token
    inner = next(t for t in target_tokens if t.end - t.start >= 2)
    one = await client.saliency(prompt=prompt, target=TARGET, target_spans=[(inner.start, inner.start + 1)])
    assert list(one.target_mask) == [t is inner for t in target_tokens]


async def test_target_token_ids_give_the_same_scores_as_the_text(
    client: AsyncSaliencyClient, srv: RunningSaliencyServer
) -> None:
    prompt = "Ids: " + PROMPT
    for model in ("tiny", "gpt2"):
        ids = [t.id for t in (await client.tokenize(TARGET, as_target=True, model=model)).tokens]
        by_text = await client.saliency(prompt=prompt, target=TARGET, model=model, methods=ALL_METHODS)
        memory_cache(srv).clear()  # force a real computation on the ids path
        by_ids = await client.saliency(prompt=prompt, target_token_ids=ids, model=model, methods=ALL_METHODS)
        assert not by_text.cache_hit and not by_ids.cache_hit
        assert by_ids.model == model
        assert [(t.id, t.part, t.special) for t in by_ids.tokens] == [
            (t.id, t.part, t.special) for t in by_text.tokens
        ]
        # the ids path's target text is the ids' decoding after the prompt's last token, so a
        # SentencePiece continuation keeps its leading space (" Paris", not "Paris") and the
        # tokens, offsets included, equal the text path's
        decoded = "".join(t.text for t in by_ids.tokens if t.part == common_pb2.TARGET)
        assert decoded == TARGET
        assert [token_tuple(t) for t in by_ids.tokens] == [token_tuple(t) for t in by_text.tokens]
        assert_close_scores(by_text, by_ids, rtol=1e-5)
        assert by_ids.target_logprob == pytest.approx(by_text.target_logprob, abs=1e-4)
        again = await client.saliency(prompt=prompt, target=TARGET, model=model, methods=ALL_METHODS)
        assert again.cache_hit  # ids and text share cache entries


async def test_integrated_gradients_reports_residual_and_steps(
    client: AsyncSaliencyClient, srv: RunningSaliencyServer
) -> None:
    prompt = "IG: " + PROMPT
    explicit = await client.saliency(
        prompt=prompt, target=TARGET, methods=[common_pb2.INTEGRATED_GRADIENTS], ig_steps=8
    )
    default = await client.saliency(
        prompt=prompt, target=TARGET, methods=[common_pb2.GRAD_L2, common_pb2.INTEGRATED_GRADIENTS]
    )
    for response, steps in ((explicit, 8), (default, srv.settings.ig_steps)):
        ig = next(m for m in response.scores if m.method == common_pb2.INTEGRATED_GRADIENTS)
        assert ig.ig_steps == steps
        assert ig.HasField("completeness_residual")
        assert math.isfinite(ig.completeness_residual) and ig.completeness_residual >= 0.0
        assert ig.scores[-1] == 0.0 and any(v != 0.0 for v in ig.scores)
    l2 = default.scores[0]
    assert l2.method == common_pb2.GRAD_L2
    assert l2.ig_steps == 0 and not l2.HasField("completeness_residual")


async def test_contrastive_foil(client: AsyncSaliencyClient) -> None:
    prompt, foil = "Foil: " + PROMPT, " Rome is the capital."
    plain = await client.saliency(prompt=prompt, target=TARGET)
    response = await client.saliency(prompt=prompt, target=TARGET, foil=foil, methods=ALL_METHODS, ig_steps=4)
    foil_tokens = (await client.tokenize(foil, as_target=True)).tokens
    n_before = len(plain.tokens)
    assert [token_tuple(t) for t in response.tokens[:n_before]] == [token_tuple(t) for t in plain.tokens]
    assert [(t.id, t.text, t.start, t.end) for t in response.tokens[n_before:]] == [
        (t.id, t.text, t.start, t.end) for t in foil_tokens
    ]
    assert all(t.part == common_pb2.FOIL for t in response.tokens[n_before:])
    assert response.HasField("foil_logprob") and response.foil_logprob < 0.0
    n_prompt = target_range(response).start
    for method_scores in response.scores:
        assert len(method_scores.scores) == len(response.tokens)
        assert all(v == 0.0 for v in method_scores.scores[n_prompt:])  # target and foil tokens: 0
        assert any(v != 0.0 for v in method_scores.scores[:n_prompt])
    # the foil does not change log p(target | prompt)
    assert list(response.target_token_logprobs) == pytest.approx(list(plain.target_token_logprobs), abs=1e-4)
    assert response.target_logprob == pytest.approx(plain.target_logprob, abs=1e-3)
    # the objective differs, so the scores differ from the plain call's
    assert not np.allclose(scores_of(response)[common_pb2.GRAD_L2][:n_prompt], scores_of(plain)[1][:n_prompt])


async def test_identical_concurrent_requests_compute_once(
    run_saliency_server: SaliencyServerFactory, llama_spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with run_saliency_server(make_settings([llama_spec])) as fresh:
        spy = install_spy(monkeypatch, fresh, delay_s=0.3)  # all five arrive while the first computes
        async with AsyncSaliencyClient(fresh.address, timeout=60.0) as c:
            kwargs: dict[str, Any] = {
                "prompt": PROMPT,
                "target": TARGET,
                "methods": ALL_METHODS,
                "ig_steps": 4,
            }
            responses = await asyncio.gather(*(c.saliency(**kwargs) for _ in range(5)))
            assert spy.calls == 1
            for response in responses[1:]:
                assert_same_scores(responses[0], response)
                assert response.target_logprob == responses[0].target_logprob
            later = await c.saliency(**kwargs)
            assert later.cache_hit and spy.calls == 1
            assert_same_scores(responses[0], later)


# --- SaliencyAllSegments ---------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", [common_pb2.WORDS, common_pb2.TOKENS])
async def test_all_segments_stream(
    client: AsyncSaliencyClient,
    srv: RunningSaliencyServer,
    monkeypatch: pytest.MonkeyPatch,
    granularity: int,
) -> None:
    prompt = f"All segments {granularity}: " + PROMPT
    methods = [common_pb2.GRAD_DOT_INPUT, common_pb2.GRAD_L2]
    reference = await client.saliency(prompt=prompt, target=TARGET, granularity=granularity, methods=methods)
    expected_segments = [s for s in reference.segments if s.part == common_pb2.TARGET]
    targets = target_range(reference)

    spy = install_spy(monkeypatch, srv)
    messages = await collect(
        client.saliency_all_segments(prompt=prompt, target=TARGET, granularity=granularity, methods=methods)
    )
    count = len(expected_segments)
    assert count >= 3
    assert len(messages) == count
    assert {m.segment_count for m in messages} == {count}
    assert sorted(m.segment_index for m in messages) == list(range(count))
    assert spy.calls == 1 and spy.masks[0].shape == (count, len(targets))  # one batch for all segments

    for message in sorted(messages, key=lambda m: m.segment_index):
        segment = message.target_segment
        expected = expected_segments[message.segment_index]
        assert (segment.part, segment.token_start, segment.token_end, segment.text) == (
            common_pb2.TARGET,
            expected.token_start,
            expected.token_end,
            expected.text,
        )
        saliency = message.saliency
        mask = [segment.token_start <= i < segment.token_end for i in targets]
        assert list(saliency.target_mask) == mask
        assert not saliency.cache_hit
        assert [m.method for m in saliency.scores] == methods
        assert [token_tuple(t) for t in saliency.tokens] == [token_tuple(t) for t in reference.tokens]
        for value, method_scores in zip(segment.scores, saliency.scores, strict=True):
            total = float(
                np.sum(method_scores.scores[segment.token_start : segment.token_end], dtype=np.float64)
            )
            assert value == pytest.approx(total, rel=1e-5, abs=1e-5)
        # the same answer as a Saliency call with this segment's mask, which is now cached
        single = await client.saliency(
            prompt=prompt, target=TARGET, granularity=granularity, methods=methods, target_mask=mask
        )
        assert single.cache_hit
        assert_same_scores(saliency, single)
        assert list(single.segments) == list(saliency.segments)
        assert single.target_logprob == saliency.target_logprob
    assert spy.calls == 1

    # computed one segment at a time (no cache), the scores agree with the batched ones
    memory_cache(srv).clear()
    for message in messages[:3]:
        single = await client.saliency(
            prompt=prompt,
            target=TARGET,
            methods=methods,
            target_mask=list(message.saliency.target_mask),
        )
        assert not single.cache_hit
        assert_close_scores(message.saliency, single)
    assert spy.calls == 4

    # a stream serves cached segments as they are and computes the rest in one batch;
    # once all are cached, the engine is not used at all
    await collect(
        client.saliency_all_segments(prompt=prompt, target=TARGET, granularity=granularity, methods=methods)
    )
    again = await collect(
        client.saliency_all_segments(prompt=prompt, target=TARGET, granularity=granularity, methods=methods)
    )
    assert spy.calls == 4 + (count > 3)  # the first of those computed the segments not yet cached
    assert all(m.saliency.cache_hit for m in again)
    assert sorted(m.segment_index for m in again) == list(range(count))


async def test_a_second_granularity_reuses_the_kept_forward_pass(
    client: AsyncSaliencyClient, srv: RunningSaliencyServer
) -> None:
    engine = srv.serving.host.get("").engine
    forwards: list[int] = []
    handle = engine.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    prompt = "Kept forward: " + PROMPT
    try:
        sentences = await collect(
            client.saliency_all_segments(prompt=prompt, target=TARGET, granularity=common_pb2.SENTENCES)
        )
        assert len(forwards) == 1 and engine.forward_cache.bytes_held() > 0
        words = await collect(
            client.saliency_all_segments(prompt=prompt, target=TARGET, granularity=common_pb2.WORDS)
        )
        assert len(forwards) == 1  # the words' backward passes ran on the sentences' forward
    finally:
        handle.remove()
    assert len(sentences) == 2 and len(words) > len(sentences)
    memory_cache(srv).clear()
    engine.forward_cache.release()
    for message in words[:2]:  # the same scores as a computation from scratch
        fresh = await client.saliency(
            prompt=prompt, target=TARGET, target_mask=list(message.saliency.target_mask)
        )
        assert not fresh.cache_hit
        assert_close_scores(message.saliency, fresh)


async def test_all_segments_with_foil_and_ig(client: AsyncSaliencyClient) -> None:
    messages = await collect(
        client.saliency_all_segments(
            prompt="Segments with foil: " + PROMPT,
            target=TARGET,
            foil=" Rome.",
            granularity=common_pb2.SENTENCES,
            methods=[common_pb2.INTEGRATED_GRADIENTS],
            ig_steps=4,
        )
    )
    assert len(messages) == messages[0].segment_count == 2  # " Paris is the capital." + " It is big."
    for message in messages:
        ig = message.saliency.scores[0]
        assert ig.ig_steps == 4 and ig.HasField("completeness_residual")
        assert message.saliency.HasField("foil_logprob")
        assert any(t.part == common_pb2.FOIL for t in message.saliency.tokens)


async def test_all_segments_requires_a_granularity(client: AsyncSaliencyClient) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await collect(client.saliency_all_segments(prompt=PROMPT, target=TARGET, granularity=0))
    assert info.value.field == "granularity" and "granularity" in info.value.message
    await still_serves(client)


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"prompt": ""}, InvalidArgumentError, "prompt"),
        ({"target": ""}, InvalidArgumentError, "target"),
        ({"model": "nope"}, NotFoundError, "model"),
        ({"methods": [7]}, InvalidArgumentError, "methods"),
        ({"granularity": 42}, InvalidArgumentError, "granularity"),
        (
            {"granularity": common_pb2.CUSTOM_REGEX, "custom_regex": "(("},
            InvalidArgumentError,
            "custom_regex",
        ),
        ({"ig_steps": 5000}, InvalidArgumentError, "ig_steps"),
        ({"target_token_ids": [99_999], "target": ""}, InvalidArgumentError, "target_token_ids"),
    ],
)
async def test_all_segments_errors(
    client: AsyncSaliencyClient, kwargs: dict[str, Any], error: type[SeqsalError], field: str
) -> None:
    request: dict[str, Any] = {"prompt": PROMPT, "target": TARGET, "granularity": common_pb2.WORDS}
    request.update(kwargs)
    with pytest.raises(error) as info:
        await collect(client.saliency_all_segments(**request))
    assert type(info.value) is error
    assert info.value.field == field and field in info.value.message
    await still_serves(client)


# --- bad input -------------------------------------------------------------------------------------

# (case id, request overrides given the number of target tokens, error class, field, message fragments)
ErrorCase = tuple[str, Callable[[int], dict[str, Any]], type[SeqsalError], str, tuple[str, ...]]
ERROR_CASES: list[ErrorCase] = [
    ("empty prompt", lambda n: {"prompt": ""}, InvalidArgumentError, "prompt", ("prompt",)),
    ("empty target", lambda n: {"target": ""}, InvalidArgumentError, "target", ("target",)),
    (
        "target and ids",
        lambda n: {"target_token_ids": [5, 6]},
        InvalidArgumentError,
        "target",
        ("target", "target_token_ids"),
    ),
    (
        "mask too long",
        lambda n: {"target_mask": [True] * (n + 1)},
        InvalidArgumentError,
        "target_mask",
        ("target_mask", "entries"),
    ),
    (
        "mask too short",
        lambda n: {"target_mask": [True]},
        InvalidArgumentError,
        "target_mask",
        ("target_mask",),
    ),
    (
        "mask selects nothing",
        lambda n: {"target_mask": [False] * n},
        InvalidArgumentError,
        "target_mask",
        ("target_mask",),
    ),
    (
        "mask and spans",
        lambda n: {"target_mask": [True] * n, "target_spans": [(0, 1)]},
        InvalidArgumentError,
        "target_spans",
        ("target_mask", "target_spans"),
    ),
    (
        "span past the end",
        lambda n: {"target_spans": [(0, 1), (3, 999)]},
        InvalidArgumentError,
        "target_spans",
        ("target_spans[1]", "999"),
    ),
    (
        "empty span",
        lambda n: {"target_spans": [(2, 2)]},
        InvalidArgumentError,
        "target_spans",
        ("target_spans",),
    ),
    (
        "invalid regex",
        lambda n: {"granularity": common_pb2.CUSTOM_REGEX, "custom_regex": "(unclosed["},
        InvalidArgumentError,
        "custom_regex",
        ("custom_regex", "(unclosed["),
    ),
    (
        "regex without CUSTOM_REGEX",
        lambda n: {"granularity": common_pb2.WORDS, "custom_regex": ","},
        InvalidArgumentError,
        "custom_regex",
        ("custom_regex", "CUSTOM_REGEX"),
    ),
    (
        "regex with no granularity",
        lambda n: {"custom_regex": ","},
        InvalidArgumentError,
        "custom_regex",
        ("custom_regex",),
    ),
    (
        "unknown method",
        lambda n: {"methods": [common_pb2.GRAD_L2, 9]},
        InvalidArgumentError,
        "methods",
        ("methods[1]", "9", "GRAD_L2"),
    ),
    (
        "METHOD_UNSPECIFIED",
        lambda n: {"methods": [common_pb2.METHOD_UNSPECIFIED]},
        InvalidArgumentError,
        "methods",
        ("methods[0]",),
    ),
    (
        "unknown granularity",
        lambda n: {"granularity": 99},
        InvalidArgumentError,
        "granularity",
        ("granularity", "99", "WORDS"),
    ),
    ("unknown model", lambda n: {"model": "nope"}, NotFoundError, "model", ("model", "nope", "tiny")),
    (
        "ig_steps too big",
        lambda n: {"ig_steps": 1025},
        InvalidArgumentError,
        "ig_steps",
        ("ig_steps", "1025"),
    ),
    ("ig_steps negative", lambda n: {"ig_steps": -1}, InvalidArgumentError, "ig_steps", ("ig_steps", "-1")),
    (
        "token id past the vocabulary",
        lambda n: {"target": "", "target_token_ids": [5, 10**6]},
        InvalidArgumentError,
        "target_token_ids",
        ("target_token_ids[1]", "1000000"),
    ),
    (
        "negative token id",
        lambda n: {"target": "", "target_token_ids": [-3]},
        InvalidArgumentError,
        "target_token_ids",
        ("target_token_ids[0]", "-3"),
    ),
    ("empty foil", lambda n: {"foil": ""}, InvalidArgumentError, "foil", ("foil",)),
]


@pytest.mark.parametrize(
    ("overrides", "error", "field", "fragments"),
    [pytest.param(*case[1:], id=case[0]) for case in ERROR_CASES],
)
async def test_bad_input_is_a_typed_error_naming_the_field(
    client: AsyncSaliencyClient,
    overrides: Callable[[int], dict[str, Any]],
    error: type[SeqsalError],
    field: str,
    fragments: tuple[str, ...],
) -> None:
    n_target = len((await client.tokenize(TARGET, as_target=True)).tokens)
    request: dict[str, Any] = {"prompt": "Bad input: " + PROMPT, "target": TARGET}
    request.update(overrides(n_target))
    with pytest.raises(SeqsalError) as info:
        await client.saliency(**request)
    assert type(info.value) is error, info.value
    assert info.value.field == field
    for fragment in fragments:
        assert fragment in info.value.message, (fragment, info.value.message)
    await still_serves(client)


async def test_each_model_runs_in_its_own_dtype(
    run_saliency_server: SaliencyServerFactory, model_specs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEQSAL_MODEL_DTYPES", "gpt2=bfloat16")
    settings = make_settings(model_specs)
    assert settings.dtype_for("gpt2") == "bfloat16" and settings.dtype_for("tiny") == "float32"
    async with run_saliency_server(settings) as mixed, AsyncSaliencyClient(mixed.address, timeout=60.0) as c:
        dtypes = {m.id: m.dtype for m in (await c.list_models()).models}
        assert dtypes == {"tiny": "float32", "gpt2": "bfloat16"}
        bf16 = await c.saliency(model="gpt2", prompt=PROMPT, target=TARGET)
        fp32 = await c.saliency(model="tiny", prompt=PROMPT, target=TARGET)
    assert (bf16.dtype, fp32.dtype) == ("bfloat16", "float32")
    assert all(np.isfinite(scores).all() and np.abs(scores).max() > 0 for scores in scores_of(bf16).values())


async def test_model_dtypes_name_hosted_models(model_specs: list[str]) -> None:
    from server_kit.model_registry import model_specs as resolve_specs

    with pytest.raises(InvalidArgumentError, match=r"not hosted: \['nope'\]") as caught:
        resolve_specs(make_settings(model_specs, model_dtypes={"nope": "bfloat16"}))
    assert caught.value.field == "model_dtypes"
    with pytest.raises(ValueError, match="ID=DTYPE"):
        SaliencySettings(_env_file=None, model_dtypes="bfloat16")  # type: ignore[call-arg]


async def test_too_many_tokens(run_saliency_server: SaliencyServerFactory, llama_spec: str) -> None:
    async with (
        run_saliency_server(make_settings([llama_spec], max_tokens=32)) as small,
        AsyncSaliencyClient(small.address, timeout=60.0) as c,
    ):
        assert (await c.list_models()).models[0].max_tokens == 32
        long_prompt = "The quick brown fox jumps over the lazy dog. " * 4
        assert len((await c.tokenize(long_prompt)).tokens) > 32
        with pytest.raises(InvalidArgumentError) as info:
            await c.saliency(prompt=long_prompt, target=TARGET)
        assert info.value.field == "prompt"
        assert "32" in info.value.message and "tokens" in info.value.message
        # prompt and target fit on their own, not together with the foil
        n = len((await c.tokenize("Hi there.")).tokens) + len(
            (await c.tokenize(TARGET, as_target=True)).tokens
        )
        assert n < 32
        with pytest.raises(InvalidArgumentError) as info:
            await c.saliency(prompt="Hi there.", target=TARGET, foil=" no" * 40)
        assert "foil" in info.value.message and "32" in info.value.message
        ok = await c.saliency(prompt="Hi there.", target=TARGET)
        assert len(ok.tokens) == n


async def test_invalid_utf8_is_invalid_argument_naming_the_field(
    srv: RunningSaliencyServer, client: AsyncSaliencyClient
) -> None:
    def patched(message: Any, marker: bytes) -> bytes:
        data = message.SerializeToString()
        assert data.count(marker) == 1
        return data.replace(marker, marker[:-1] + b"\xff")  # same length: still well-formed protobuf

    cases: list[tuple[str, bool, bytes, str]] = [
        (
            "/seqsal.v1.SaliencyService/Saliency",
            False,
            patched(saliency_pb2.SaliencyRequest(prompt="PROMPTMARK", target=" x"), b"PROMPTMARK"),
            "prompt",
        ),
        (
            "/seqsal.v1.SaliencyService/Saliency",
            False,
            patched(saliency_pb2.SaliencyRequest(prompt="hi", target="TARGETMARK", foil="f"), b"TARGETMARK"),
            "target",
        ),
        (
            "/seqsal.v1.SaliencyService/Saliency",
            False,
            b"\x12\x01\xff",  # hand-encoded: field 2 (prompt), length 1, byte 0xff
            "prompt",
        ),
        (
            "/seqsal.v1.SaliencyService/Tokenize",
            False,
            patched(common_pb2.TokenizeRequest(text="TEXTMARK"), b"TEXTMARK"),
            "text",
        ),
        (
            "/seqsal.v1.SaliencyService/SaliencyAllSegments",
            True,
            patched(
                saliency_pb2.SaliencyAllSegmentsRequest(prompt="PROMPTMARK", target=" x", granularity=1),
                b"PROMPTMARK",
            ),
            "prompt",
        ),
    ]
    async with grpc.aio.insecure_channel(srv.address) as channel:
        for method, streaming, data, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                if streaming:
                    call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
                    [_ async for _ in call(data, timeout=10)]
                else:
                    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
                    await call(data, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value.details())
            error = error_from_rpc(info.value)
            assert isinstance(error, InvalidArgumentError)
            assert error.field == field and field in error.message and "UTF-8" in error.message

        # bytes that are no protobuf at all
        call = channel.unary_unary(
            "/seqsal.v1.SaliencyService/Saliency", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "seqsal.v1.SaliencyRequest" in (info.value.details() or "")
    await still_serves(client)


async def test_large_messages_are_accepted_up_to_max_message_mb(
    run_saliency_server: SaliencyServerFactory,
    srv: RunningSaliencyServer,
    client: AsyncSaliencyClient,
    llama_spec: str,
) -> None:
    size = srv.settings.max_message_mb * 1024 * 1024
    options = dict(server_options(srv.settings))
    assert options["grpc.max_receive_message_length"] == size
    assert options["grpc.max_send_message_length"] == size

    # 5 MB is over gRPC's default 4 MiB limit; ig_steps is checked before tokenisation, so the
    # answer is quick and proves the server read the whole message.
    huge = "The quick brown fox. " * (5 * 1024 * 1024 // 21)
    started = time.perf_counter()
    with pytest.raises(InvalidArgumentError) as info:
        await client.saliency(prompt=huge, target=TARGET, ig_steps=-1)
    assert info.value.field == "ig_steps"
    assert time.perf_counter() - started < 10

    # a server limited to 4 MiB refuses the same message at the gRPC layer
    async with (
        run_saliency_server(make_settings([llama_spec], max_message_mb=4)) as small,
        AsyncSaliencyClient(small.address, timeout=30.0) as c,
    ):
        with pytest.raises(ResourceExhaustedError):
            await c.saliency(prompt=huge, target=TARGET, ig_steps=-1)
        await c.list_models()  # still serving


# --- admission, deadlines, cancellation ----------------------------------------------------------


@pytest.mark.parametrize("max_queue", [0, 1])
async def test_queue_bound_refuses_with_resource_exhausted(
    run_saliency_server: SaliencyServerFactory,
    llama_spec: str,
    monkeypatch: pytest.MonkeyPatch,
    max_queue: int,
) -> None:
    settings = make_settings([llama_spec], max_concurrency=1, max_queue=max_queue)
    async with run_saliency_server(settings) as busy, AsyncSaliencyClient(busy.address, timeout=60.0) as c:
        spy = install_spy(monkeypatch, busy, delay_s=1.0)
        results = await asyncio.gather(
            *(c.saliency(prompt=f"Request number {i}.", target=TARGET) for i in range(3)),
            return_exceptions=True,
        )
        ok = [r for r in results if isinstance(r, saliency_pb2.SaliencyResponse)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(ok) == 1 + max_queue and spy.calls == 1 + max_queue
        assert len(refused) == 2 - max_queue
        for error in refused:
            assert isinstance(error, ResourceExhaustedError), repr(error)
            assert "queue" in error.message.lower()
        spy.delay_s = 0.0
        after = await c.saliency(prompt="After the rush.", target=TARGET)
        assert not after.cache_hit and len(after.scores) == 2
        assert busy.serving.admission.depth == 0


@pytest.mark.parametrize("how", ["deadline", "client cancel"])
async def test_deadline_or_cancel_stops_the_worker(
    run_saliency_server: SaliencyServerFactory, llama_spec: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    async with (
        run_saliency_server(make_settings([llama_spec])) as slow,
        AsyncSaliencyClient(slow.address, timeout=60.0) as c,
    ):
        spy = install_spy(monkeypatch, slow, delay_s=20.0)
        started = time.monotonic()
        if how == "deadline":
            with pytest.raises(DeadlineExceededError):
                await c.saliency(prompt=PROMPT, target=TARGET, timeout=0.5)
        else:
            task = asyncio.create_task(c.saliency(prompt=PROMPT, target=TARGET))
            await wait_for(spy.started.is_set)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # the server tells the worker to stop; the stalled engine notices within a tick
        await wait_for(spy.saw_cancel.is_set, timeout=5.0)
        assert spy.cancel_checks and spy.cancel_checks[0]()
        await wait_for(lambda: slow.serving.admission.depth == 0, timeout=5.0)
        assert time.monotonic() - started < 10
        spy.delay_s = 0.0
        nxt = await c.saliency(prompt="Next one.", target=TARGET)
        assert len(nxt.scores) == 2
        # the abandoned request was not cached
        retry = await c.saliency(prompt=PROMPT, target=TARGET)
        assert not retry.cache_hit and spy.calls == 3


async def test_deadline_on_the_stream_stops_the_worker(
    run_saliency_server: SaliencyServerFactory, llama_spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        run_saliency_server(make_settings([llama_spec])) as slow,
        AsyncSaliencyClient(slow.address, timeout=60.0) as c,
    ):
        spy = install_spy(monkeypatch, slow, delay_s=20.0)
        with pytest.raises(DeadlineExceededError):
            await collect(
                c.saliency_all_segments(
                    prompt=PROMPT, target=TARGET, granularity=common_pb2.WORDS, timeout=0.5
                )
            )
        await wait_for(spy.saw_cancel.is_set, timeout=5.0)
        await wait_for(lambda: slow.serving.admission.depth == 0, timeout=5.0)
        spy.delay_s = 0.0
        messages = await collect(
            c.saliency_all_segments(prompt=PROMPT, target=TARGET, granularity=common_pb2.WORDS)
        )
        assert len(messages) == messages[0].segment_count
