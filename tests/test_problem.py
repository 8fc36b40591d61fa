"""The teacher-forced problem on the wire: embedded or in the deprecated flat fields, prompt as
text or as the ids Generate returned, on a tiny chat Llama through real servers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

from inference_server.settings import InferenceSettings
from saliency_server.cache import InMemoryCache
from saliency_server.settings import SaliencySettings
from seqsal.client import (
    AsyncInferenceClient,
    AsyncSaliencyClient,
    WholeMessages,
    all_segments_request,
    error_from_rpc,
    saliency_request,
)
from seqsal.errors import InvalidArgumentError
from seqsal.v1 import common_pb2, saliency_pb2, saliency_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "The capital of France is"
FLAT = {
    "prompt": PROMPT,
    "target": " Paris. It is big.",
    "methods": [common_pb2.GRAD_DOT_INPUT, common_pb2.INTEGRATED_GRADIENTS],
    "foil": " Rome.",
    "granularity": common_pb2.WORDS,
    "ig_steps": 4,
}


S = TypeVar("S", SaliencySettings, InferenceSettings)


def settings(model_dir: Path, *, cls: type[S] = SaliencySettings) -> S:  # type: ignore[assignment]
    values: dict[str, Any] = {
        "models": [f"tiny={model_dir}"],
        "port": 0,
        "device": "cpu",
        "dtype": "float32",
        "redis_url": None,
        "backend": "transformers",
        "metrics_port": 0,
    }
    return cls(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(scope="module")
async def saliency(run_saliency_server, tiny_chat_llama_dir: Path):  # type: ignore[no-untyped-def]
    async with run_saliency_server(settings(tiny_chat_llama_dir)) as srv:
        yield srv


@pytest.fixture(scope="module")
async def client(saliency) -> AsyncIterator[AsyncSaliencyClient]:  # type: ignore[no-untyped-def]
    async with AsyncSaliencyClient(saliency.address, timeout=60.0) as c:
        yield c


@pytest.fixture(scope="module")
async def inference(run_inference_server, tiny_chat_llama_dir: Path) -> AsyncIterator[AsyncInferenceClient]:  # type: ignore[no-untyped-def]
    async with (
        run_inference_server(settings(tiny_chat_llama_dir, cls=InferenceSettings)) as srv,
        AsyncInferenceClient(srv.address, timeout=60.0) as c,
    ):
        yield c


def clear(saliency: Any) -> None:
    cache = saliency.serving.cache
    assert isinstance(cache, InMemoryCache)
    cache.clear()


def answer(response: saliency_pb2.SaliencyResponse) -> saliency_pb2.SaliencyResponse:
    """The response without what differs between two calls (time, cache hit)."""
    out = saliency_pb2.SaliencyResponse()
    out.CopyFrom(response)
    out.ClearField("server_time_ms")
    out.ClearField("cache_hit")
    return out


async def test_flat_and_embedded_forms_give_identical_responses(
    client: AsyncSaliencyClient, saliency
) -> None:  # type: ignore[no-untyped-def]
    stub = saliency_pb2_grpc.SaliencyServiceStub(client.channel)
    n_target = len((await client.tokenize(FLAT["target"], as_target=True)).tokens)
    mask = [i % 3 == 0 for i in range(n_target)]
    embedded = saliency_request(target_mask=mask, **FLAT)
    assert embedded.problem.prompt == PROMPT and not embedded.prompt  # the builder embeds
    flat = saliency_pb2.SaliencyRequest(target_mask=list(embedded.target_mask), **FLAT)  # an old client
    clear(saliency)
    old = await stub.Saliency(flat)
    clear(saliency)
    new = await client.saliency(embedded)
    assert not old.cache_hit and not new.cache_hit
    assert answer(old) == answer(new) and len(new.segments) > 3

    clear(saliency)
    old_stream = [m async for m in stub.SaliencyAllSegments(saliency_pb2.SaliencyAllSegmentsRequest(**FLAT))]
    clear(saliency)
    new_stream = [m async for m in client.saliency_all_segments(all_segments_request(**FLAT))]
    assert len(old_stream) == len(new_stream) == old_stream[0].segment_count >= 3
    by_index = {m.segment_index: m for m in new_stream}
    for message in old_stream:
        other = by_index[message.segment_index]
        assert message.target_segment == other.target_segment
        assert answer(message.saliency) == answer(other.saliency)


async def test_both_forms_are_invalid_argument_naming_the_fields(client: AsyncSaliencyClient) -> None:
    stub = saliency_pb2_grpc.SaliencyServiceStub(client.channel)
    problem = saliency_request(**FLAT).problem
    both = saliency_pb2.SaliencyRequest(problem=problem, prompt=PROMPT, ig_steps=4)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Saliency(both)
    error = error_from_rpc(caught.value)
    assert isinstance(error, InvalidArgumentError) and error.field == "prompt"
    assert "problem" in error.message and "prompt, ig_steps" in error.message
    stream = stub.SaliencyAllSegments(saliency_pb2.SaliencyAllSegmentsRequest(problem=problem, model="tiny"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [m async for m in stream]
    assert error_from_rpc(caught.value).field == "model"
    # Verify's problem is a SaliencyRequest: the same rule, under its field name
    with pytest.raises(InvalidArgumentError) as info:
        await client.verify(problem=both)
    assert info.value.field == "problem.prompt" and "problem.problem" in info.value.message


async def test_prompt_ids_from_generate_explain_the_same_as_the_text(
    client: AsyncSaliencyClient, inference: AsyncInferenceClient, saliency: Any
) -> None:
    generated = await inference.generate(prompt=PROMPT, max_tokens=6)
    assert generated.prompt == PROMPT  # untemplated: the text as sent
    target = list(generated.candidates[0].token_ids)
    common = {"target_token_ids": target, "granularity": common_pb2.WORDS}
    clear(saliency)
    by_text = await client.saliency(prompt=PROMPT, **common)
    clear(saliency)
    by_ids = await client.saliency(prompt_token_ids=list(generated.prompt_token_ids), **common)
    assert not by_ids.cache_hit
    assert answer(by_ids) == answer(by_text)  # tokens, offsets, segments and scores alike


async def test_templated_prompt_ids_are_used_as_given(
    client: AsyncSaliencyClient, inference: AsyncInferenceClient
) -> None:
    generated = await inference.generate(prompt="Hi there", use_chat_template=True, max_tokens=6)
    prompt_ids = list(generated.prompt_token_ids)
    bos = prompt_ids[0]
    assert prompt_ids.count(bos) == 1
    target = list(generated.candidates[0].token_ids)
    # ids no text tokenises to (a doubled BOS): what is sent is what is explained
    given = [bos, *prompt_ids]
    explained = await client.saliency(prompt_token_ids=given, target_token_ids=target)
    assert [t.id for t in explained.tokens] == given + target
    prompt_tokens = [t for t in explained.tokens if t.part == common_pb2.PROMPT]
    assert [t.special for t in prompt_tokens][:2] == [True, True] and not any(
        t.special for t in prompt_tokens[2:]
    )
    text = "".join(t.text for t in prompt_tokens if not t.special)
    assert text and generated.prompt.endswith(text)  # the display texts are the ids' decoding
    assert all(t.start <= t.end for t in prompt_tokens)
    scored = await inference.score(prompt_token_ids=[given], targets=[target])
    np.testing.assert_allclose(explained.target_token_logprobs, scored.scores[0].logprobs, atol=1e-4)


@pytest.mark.parametrize(
    ("problem", "field", "fragment"),
    [
        ({"prompt_token_ids": [1, 10**6]}, "prompt_token_ids", "prompt_token_ids[1] = 1000000"),
        ({"prompt_token_ids": [-2]}, "prompt_token_ids", "prompt_token_ids[0] = -2"),
        ({"prompt_token_ids": [1]}, "prompt_token_ids", "only special tokens"),
        ({}, "prompt", "prompt_token_ids"),
        ({"prompt": PROMPT, "prompt_token_ids": [1, 5]}, "prompt", "prompt_token_ids"),
    ],
)
async def test_bad_prompt_ids_name_the_field(
    client: AsyncSaliencyClient, problem: dict[str, Any], field: str, fragment: str
) -> None:
    fields = {"target": " Paris.", "granularity": common_pb2.WORDS} | problem
    with pytest.raises(InvalidArgumentError) as info:
        await client.saliency(**fields)
    assert info.value.field == field and fragment in info.value.message
    with pytest.raises(InvalidArgumentError) as info:
        [m async for m in client.saliency_all_segments(**fields)]
    assert info.value.field == field


async def test_a_tokens_once_stream_equals_the_whole_one_restored(
    client: AsyncSaliencyClient, saliency: Any
) -> None:
    fields = FLAT | {"methods": [common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT], "foil": None}
    clear(saliency)
    compact = [m async for m in client.saliency_all_segments(tokens_once=True, **fields)]
    whole = [m async for m in client.saliency_all_segments(**fields)]  # from the cache
    assert len(compact) == len(whole) == compact[0].segment_count >= 3
    assert compact[0].saliency.tokens and compact[0].saliency.segments
    assert not any(m.saliency.tokens or m.saliency.segments for m in compact[1:])
    assert sum(m.ByteSize() for m in compact) < sum(m.ByteSize() for m in whole)
    restore = WholeMessages()
    restored = {m.segment_index: restore(m) for m in compact}
    for message in whole:
        other = restored[message.segment_index]
        assert message.target_segment == other.target_segment
        assert answer(message.saliency) == answer(other.saliency)  # segment sums to the last bit


async def test_long_prompt_ids_take_the_tokenizers_offsets(saliency: Any) -> None:  # the module is asyncio
    from server_kit.tokenization import prompt_tokens_from_ids, tokenize, tokens_from_ids

    tokenizer = saliency.serving.host.get("").tokenizer
    text = "The quick brown fox jumps over the lazy dog.\n" * 120
    by_text = tokenize(tokenizer, text, part=common_pb2.PROMPT, add_special_tokens=True)
    ids = [t.id for t in by_text]
    assert len(ids) > 1000
    assert prompt_tokens_from_ids(tokenizer, ids, field="prompt_token_ids") == by_text  # linear time
    head = ids[:30]  # the same tokens token by token (the slow, general way)
    assert prompt_tokens_from_ids(tokenizer, head, field="f") == tokens_from_ids(
        tokenizer, head, part=common_pb2.PROMPT, field="f"
    )
