"""Hostile input, property-based, against every SaliencyService RPC of a real in-process server.

Hypothesis draws requests from a valid base with any subset of fields replaced by hostile
values (arbitrary Unicode with control chars, empty and 1 MB strings, long repeated fields,
masks and spans of the wrong length, negative and int32-extreme numbers, unknown enum values,
random and catastrophic regexes) and raw requests with invalid UTF-8 in a string field. Every
call must be answered within its deadline with OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED or
NOT_FOUND naming a request field (see ``tests/fuzz_support.py``), an OK answer must be
well-formed, and a health probe thread must get every one of its checks answered throughout.
``SEQSAL_FUZZ_EXAMPLES=2000`` runs a longer, random campaign.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fuzz_support as fz
import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_grpc_saliency import make_settings

from seqsal.v1 import common_pb2, saliency_pb2, saliency_pb2_grpc

if TYPE_CHECKING:
    from conftest import RunningSaliencyServer, SaliencyServerFactory

pytestmark = pytest.mark.asyncio(loop_scope="session")

MAX_TOKENS = 96
TALLY = fz.Tally()
STUB = saliency_pb2_grpc.SaliencyServiceStub


@pytest.fixture(scope="module")
async def fuzz_srv(
    run_saliency_server: SaliencyServerFactory, tiny_model_dirs: dict[str, Path]
) -> AsyncIterator[RunningSaliencyServer]:
    models = [f"tiny={tiny_model_dirs['llama']}", f"gpt2={tiny_model_dirs['gpt2']}"]
    settings = make_settings(models, max_tokens=MAX_TOKENS, max_queue=4, ig_steps=4)
    async with run_saliency_server(settings) as running:
        yield running
    print("\n" + TALLY.report("saliency"))


# --- strategies ------------------------------------------------------------------------------------

MODELS = st.one_of(
    st.sampled_from(["", "tiny", "gpt2"]), st.sampled_from(["nope", "TINY", " tiny"]), fz.texts(20)
)
GRANULARITIES = st.one_of(st.sampled_from(list(common_pb2.Granularity.values())), fz.int32s())
METHODS = st.lists(st.one_of(st.sampled_from(list(common_pb2.Method.values())), fz.int32s()), max_size=6)
SPANS = st.lists(
    st.tuples(fz.int32s(), fz.int32s()).map(lambda se: common_pb2.CharSpan(start=se[0], end=se[1])),
    max_size=8,
)
MASKS = st.one_of(st.lists(st.booleans(), max_size=40), st.just([True] * 5000))
IG_STEPS = st.one_of(st.integers(0, 6), st.integers(*fz.INT32), st.sampled_from([1024, 1025, -1]))

COMMON_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": MODELS,
    "prompt": fz.texts(),
    "target": fz.texts(),
    "target_token_ids": fz.token_ids(),
    "methods": METHODS,
    "foil": fz.texts(),
    "granularity": GRANULARITIES,
    "custom_regex": fz.regexes(),
    "_regex": st.fixed_dictionaries(
        {"granularity": st.just(common_pb2.CUSTOM_REGEX), "custom_regex": fz.regexes()}
    ),
    "ig_steps": IG_STEPS,
}
BASE = {"prompt": "Q: Hi?\nA:", "target": " Hello there. Bye.", "model": "tiny"}
SALIENCY_REQUESTS = fz.with_overrides(
    saliency_pb2.SaliencyRequest, BASE, COMMON_FIELDS | {"target_mask": MASKS, "target_spans": SPANS}
)
ALL_SEGMENTS_REQUESTS = fz.with_overrides(
    saliency_pb2.SaliencyAllSegmentsRequest, BASE | {"granularity": common_pb2.SENTENCES}, COMMON_FIELDS
)
TOKENIZE_REQUESTS = fz.tokenize_requests(MODELS)


# --- what a good answer looks like -------------------------------------------------------------------


def check_saliency(request: Any, response: saliency_pb2.SaliencyResponse) -> None:
    n = len(response.tokens)
    assert n > 0 and response.model
    n_target = sum(t.part == common_pb2.TARGET for t in response.tokens)
    assert n_target > 0 and len(response.target_mask) == n_target and any(response.target_mask)
    assert response.scores and all(len(s.scores) == n for s in response.scores)
    if response.granularity != common_pb2.GRANULARITY_UNSPECIFIED:
        starts = [s.token_start for s in response.segments]
        ends = [s.token_end for s in response.segments]
        assert starts[0] == 0 and ends[-1] == n and starts[1:] == ends[:-1]  # segments tile the tokens
    prompt_text = "".join(t.text for t in response.tokens if t.part == common_pb2.PROMPT and not t.special)
    assert prompt_text == request.prompt  # tokens tile the prompt exactly


# --- tests ---------------------------------------------------------------------------------------------


def check_all_segments(request: saliency_pb2.SaliencyAllSegmentsRequest, messages: list[Any]) -> None:
    for message in messages:
        assert message.segment_count == len(messages) and message.segment_index in range(len(messages))
        assert message.target_segment.part == common_pb2.TARGET
        check_saliency(request, message.saliency)


async def test_fuzz_saliency(fuzz_srv: RunningSaliencyServer) -> None:
    await fz.fuzz_rpc(fuzz_srv.address, TALLY, STUB, "Saliency", SALIENCY_REQUESTS, check_saliency, 50)


async def test_fuzz_saliency_all_segments(fuzz_srv: RunningSaliencyServer) -> None:
    await fz.fuzz_rpc(
        fuzz_srv.address,
        TALLY,
        STUB,
        "SaliencyAllSegments",
        ALL_SEGMENTS_REQUESTS,
        check_all_segments,
        40,
        stream=True,
    )


async def test_fuzz_tokenize_and_list_models(fuzz_srv: RunningSaliencyServer) -> None:
    await fz.fuzz_rpc(fuzz_srv.address, TALLY, STUB, "Tokenize", TOKENIZE_REQUESTS, fz.check_tokens, 25)


@st.composite
def raw_requests(draw: st.DrawFn) -> fz.RawRequest:
    """A valid request's bytes with one string field appended again as invalid UTF-8."""
    name, base, streaming = draw(
        st.sampled_from(
            [
                ("Saliency", saliency_pb2.SaliencyRequest(**BASE, granularity=common_pb2.WORDS), False),
                ("SaliencyAllSegments", saliency_pb2.SaliencyAllSegmentsRequest(**BASE, granularity=1), True),
                ("Tokenize", common_pb2.TokenizeRequest(text="Hi"), False),
            ]
        )
    )
    field = draw(st.sampled_from([f.name for f in base.DESCRIPTOR.fields if f.type == f.TYPE_STRING]))
    return fz.corrupted(name, base, streaming, field, draw(fz.invalid_utf8()))


async def test_fuzz_invalid_utf8_is_invalid_argument_naming_the_field(
    fuzz_srv: RunningSaliencyServer,
) -> None:
    await fz.fuzz_raw(fuzz_srv.address, TALLY, "seqsal.v1.SaliencyService", raw_requests())


async def test_fuzz_concurrent_bursts_are_answered_or_refused(fuzz_srv: RunningSaliencyServer) -> None:
    """Bursts over the queue bound: each call is answered or refused with RESOURCE_EXHAUSTED, none hangs.

    Mostly valid requests with new prompts (nothing cached), some hostile ones among them; the
    server computes one at a time and queues 4, so a burst of 8 to 16 overflows the queue.
    """
    fresh = st.text(min_size=1, max_size=30).map(
        lambda p: saliency_pb2.SaliencyRequest(**(BASE | {"prompt": p}))
    )

    def body(channel: grpc.Channel) -> None:
        stub = STUB(channel)

        @fz.fuzz_settings(3)
        @given(batch=st.lists(st.one_of(fresh, fresh, fresh, SALIENCY_REQUESTS), min_size=8, max_size=16))
        def fuzz(batch: list[saliency_pb2.SaliencyRequest]) -> None:
            def one(request: saliency_pb2.SaliencyRequest) -> None:
                response, _ = fz.call(
                    TALLY,
                    "Saliency",
                    saliency_pb2.SaliencyRequest,
                    lambda t: stub.Saliency(request, timeout=t),
                )
                if response is not None:
                    check_saliency(request, response)

            with ThreadPoolExecutor(len(batch)) as pool:
                list(pool.map(one, batch))

        fuzz()

    await fz.fuzz_with_probe(fuzz_srv.address, TALLY, body)
