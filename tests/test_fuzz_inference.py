"""Hostile input, property-based, against every InferenceService RPC (transformers backend, tiny models).

Like ``tests/test_fuzz_saliency.py``: requests from a valid base with up to three fields made
hostile (arbitrary and 1 MB strings, many and empty stop strings, NaN/inf/negative floats,
int32/int64 extremes, many targets, targets with both or neither of text and ids), raw requests
with invalid UTF-8 in a string field (nested ``targets.text`` included), each answered within
its deadline with an allowed status naming a request field, while a health probe keeps getting
answers. ``SEQSAL_FUZZ_EXAMPLES=2000`` runs a longer, random campaign.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fuzz_support as fz
import pytest
from hypothesis import strategies as st

from inference_server.settings import InferenceSettings
from seqsal.v1 import common_pb2, inference_pb2, inference_pb2_grpc

if TYPE_CHECKING:
    from conftest import RunningInferenceServer

pytestmark = pytest.mark.asyncio(loop_scope="session")

MAX_TOKENS = 96
TALLY = fz.Tally()
STUB = inference_pb2_grpc.InferenceServiceStub


@pytest.fixture(scope="module")
async def fuzz_srv(
    run_inference_server: Any, tiny_chat_llama_dir: Path, tiny_model_dirs: dict[str, Path]
) -> AsyncIterator[RunningInferenceServer]:
    settings = InferenceSettings(
        _env_file=None,  # type: ignore[call-arg]
        models=[f"tiny={tiny_chat_llama_dir}", f"gpt2={tiny_model_dirs['gpt2']}"],
        backend="transformers",
        device="cpu",
        dtype="float32",
        max_candidates=4,
        default_max_new_tokens=4,
        max_concurrency=4,
    )
    async with run_inference_server(settings) as running:
        yield running
    print("\n" + TALLY.report("inference"))


# --- strategies ------------------------------------------------------------------------------------

MODELS = st.one_of(st.sampled_from(["", "tiny", "gpt2"]), st.sampled_from(["nope", "GPT2"]), fz.texts(20))
FLOATS = st.one_of(
    st.floats(0, 2, width=32),
    st.floats(width=32),  # NaN, ±inf, negatives, huge
    st.sampled_from([0.0, -0.0, 1.0, 2.0, 2.0000002, math.nan, math.inf, -math.inf]),
)
STOPS = st.one_of(
    st.lists(fz.texts(12), max_size=4),
    st.lists(st.text(max_size=3), min_size=15, max_size=40),
    st.just([""]),
    st.just(["x" * 100_000]),
)
GENERATE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": MODELS,
    "prompt": fz.texts(),
    "n": st.one_of(st.integers(0, 5), fz.int32s()),
    "max_tokens": st.one_of(st.integers(0, 8), fz.int32s()),
    "temperature": FLOATS,
    "top_p": FLOATS,
    "top_k": st.one_of(st.integers(0, 50), fz.int32s()),
    "seed": st.integers(*fz.INT64),
    "stop": STOPS,
    "use_chat_template": st.booleans(),
    "system_prompt": fz.texts(),
    "_sampled": st.fixed_dictionaries(  # several candidates need temperature > 0
        {"n": st.integers(1, 4), "temperature": st.floats(0.125, 2, width=32), "seed": st.integers(*fz.INT64)}
    ),
}
GENERATE_BASE = {"prompt": "The cat sat", "max_tokens": 3, "model": "tiny"}
GENERATE_REQUESTS = fz.with_overrides(inference_pb2.GenerateRequest, GENERATE_BASE, GENERATE_FIELDS)

SCORE_TARGETS = st.lists(
    st.one_of(
        fz.texts().map(lambda t: inference_pb2.ScoreTarget(text=t)),
        fz.token_ids().map(lambda ids: inference_pb2.ScoreTarget(token_ids=ids)),
        st.just(inference_pb2.ScoreTarget(text="both", token_ids=[5])),
        st.just(inference_pb2.ScoreTarget()),
    ),
    max_size=6,
)
SCORE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": MODELS,
    "prompt": fz.texts(),
    "targets": st.one_of(SCORE_TARGETS, st.just([inference_pb2.ScoreTarget(text=" on")] * 300)),
    "use_chat_template": st.booleans(),
    "system_prompt": fz.texts(),
}
SCORE_BASE = {
    "prompt": "The cat sat",
    "targets": [inference_pb2.ScoreTarget(text=" on the mat")],
    "model": "gpt2",
}
SCORE_REQUESTS = fz.with_overrides(inference_pb2.ScoreRequest, SCORE_BASE, SCORE_FIELDS)
TOKENIZE_REQUESTS = fz.tokenize_requests(MODELS)


# --- what a good answer looks like -------------------------------------------------------------------


def max_new(request: inference_pb2.GenerateRequest) -> int:
    return request.max_tokens or 4  # default_max_new_tokens (or less, if the prompt leaves less room)


def check_candidate(request: inference_pb2.GenerateRequest, ids: list[int], logprobs: list[float]) -> None:
    assert len(ids) == len(logprobs) and 0 < len(ids) <= max_new(request)
    assert all(math.isfinite(lp) and lp <= 1e-4 for lp in logprobs), logprobs


def check_generate(request: inference_pb2.GenerateRequest, response: inference_pb2.GenerateResponse) -> None:
    assert [c.index for c in response.candidates] == list(range(request.n or 1))
    assert response.prompt_token_ids and response.model in {"tiny", "gpt2"}
    for candidate in response.candidates:
        check_candidate(request, list(candidate.token_ids), list(candidate.logprobs))
        assert candidate.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED


def check_stream(request: inference_pb2.GenerateRequest, messages: list[Any]) -> None:
    assert messages and messages[0].prompt_token_ids and messages[0].model in {"tiny", "gpt2"}
    by_index: dict[int, list[Any]] = {}
    for message in messages:
        by_index.setdefault(message.index, []).append(message)
    assert sorted(by_index) == list(range(request.n or 1))
    for stream in by_index.values():
        ids = [t for m in stream for t in m.token_ids]
        check_candidate(request, ids, [lp for m in stream for lp in m.logprobs])
        assert stream[-1].finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED


def check_score(request: inference_pb2.ScoreRequest, response: inference_pb2.ScoreResponse) -> None:
    assert len(response.scores) == len(request.targets) and response.prompt_token_ids
    for target, score in zip(request.targets, response.scores, strict=True):
        assert len(score.logprobs) == len(score.token_ids) > 0
        if target.token_ids:
            assert list(score.token_ids) == list(target.token_ids)
        assert math.isfinite(score.total_logprob) and score.total_logprob <= 1e-3


# --- tests ---------------------------------------------------------------------------------------------


async def test_fuzz_generate(fuzz_srv: RunningInferenceServer) -> None:
    await fz.fuzz_rpc(fuzz_srv.address, TALLY, STUB, "Generate", GENERATE_REQUESTS, check_generate, 25)


async def test_fuzz_generate_stream(fuzz_srv: RunningInferenceServer) -> None:
    await fz.fuzz_rpc(
        fuzz_srv.address, TALLY, STUB, "GenerateStream", GENERATE_REQUESTS, check_stream, 25, stream=True
    )


async def test_fuzz_score(fuzz_srv: RunningInferenceServer) -> None:
    await fz.fuzz_rpc(fuzz_srv.address, TALLY, STUB, "Score", SCORE_REQUESTS, check_score, 40)


async def test_fuzz_tokenize_and_list_models(fuzz_srv: RunningInferenceServer) -> None:
    await fz.fuzz_rpc(fuzz_srv.address, TALLY, STUB, "Tokenize", TOKENIZE_REQUESTS, fz.check_tokens, 25)


@st.composite
def raw_requests(draw: st.DrawFn) -> fz.RawRequest:
    """A valid request's bytes with one string field (maybe nested) appended again as invalid UTF-8."""
    name = draw(st.sampled_from(["Generate", "GenerateStream", "Score", "Tokenize"]))
    payload = draw(fz.invalid_utf8())
    base: Any = {
        "Generate": inference_pb2.GenerateRequest(**GENERATE_BASE),
        "GenerateStream": inference_pb2.GenerateRequest(**GENERATE_BASE),
        "Score": inference_pb2.ScoreRequest(**SCORE_BASE),
        "Tokenize": common_pb2.TokenizeRequest(text="Hi"),
    }[name]
    if name == "Score" and draw(st.booleans()):  # a nested string: ScoreRequest.targets[].text
        nested = fz.corrupted(name, inference_pb2.ScoreTarget(token_ids=[5]), False, "text", payload)[3]
        number = base.DESCRIPTOR.fields_by_name["targets"].number
        return (
            name,
            type(base),
            False,
            base.SerializeToString() + fz.length_delimited(number, nested),
            "targets.text",
        )
    field = draw(st.sampled_from([f.name for f in base.DESCRIPTOR.fields if f.type == f.TYPE_STRING]))
    return fz.corrupted(name, base, name == "GenerateStream", field, payload)


async def test_fuzz_invalid_utf8_is_invalid_argument_naming_the_field(
    fuzz_srv: RunningInferenceServer,
) -> None:
    await fz.fuzz_raw(fuzz_srv.address, TALLY, "seqsal.v1.InferenceService", raw_requests())
