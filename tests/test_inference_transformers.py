"""The inference server on the transformers backend, through a real gRPC server, on tiny models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch

from inference_server.settings import InferenceSettings
from saliency_server.settings import SaliencySettings
from seqsal import errors
from seqsal.client import AsyncInferenceClient, AsyncSaliencyClient
from seqsal.v1 import inference_pb2
from server_kit.model_registry import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "The cat sat on the mat. The dog"


@pytest.fixture(scope="module")
async def server(run_inference_server, tiny_chat_llama_dir: Path, tiny_model_dirs: dict[str, Path]):  # type: ignore[no-untyped-def]
    settings = InferenceSettings(
        models=[f"tiny={tiny_chat_llama_dir}", f"gpt2={tiny_model_dirs['gpt2']}"], backend="transformers"
    )
    async with run_inference_server(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
async def client(server) -> AsyncIterator[AsyncInferenceClient]:  # type: ignore[no-untyped-def]
    async with AsyncInferenceClient(server.address) as c:
        yield c


def greedy_reference(model_dir: Path, prompt_ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Independent greedy decoding: argmax of a full forward pass at every step."""
    model = load_causal_lm(model_dir, torch.device("cpu"), torch.float32)
    ids, logprobs = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(steps):
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            token = int(lp.argmax())
            ids.append(token)
            logprobs.append(float(lp[token]))
    return ids[len(prompt_ids) :], logprobs


async def test_greedy_matches_independent_decoding(client: AsyncInferenceClient, tiny_model_dirs) -> None:  # type: ignore[no-untyped-def]
    for model in ("tiny", "gpt2"):
        response = await client.generate(prompt=PROMPT, max_tokens=12, model=model)
        (candidate,) = response.candidates
        model_dir = tiny_model_dirs["llama" if model == "tiny" else "gpt2"]
        tokenizer = load_tokenizer(model_dir)
        assert list(response.prompt_token_ids) == tokenizer(PROMPT)["input_ids"]
        expected_ids, expected_lp = greedy_reference(model_dir, list(response.prompt_token_ids), 12)
        eos = tokenizer.eos_token_id
        n = len(candidate.token_ids)
        assert list(candidate.token_ids) == expected_ids[:n]
        np.testing.assert_allclose(candidate.logprobs, expected_lp[:n], atol=1e-4)
        if candidate.finish_reason == inference_pb2.LENGTH:
            assert n == 12
        else:
            assert candidate.finish_reason == inference_pb2.STOP and candidate.token_ids[-1] == eos
        assert candidate.text == tokenizer.decode(list(candidate.token_ids), skip_special_tokens=True)


async def test_stream_equals_unary(client: AsyncInferenceClient) -> None:
    unary = await client.generate(prompt=PROMPT, max_tokens=10, n=2, temperature=0.8, seed=7)
    pieces: dict[int, list[inference_pb2.GenerateStreamResponse]] = {}
    messages = [
        m async for m in client.generate_stream(prompt=PROMPT, max_tokens=10, n=2, temperature=0.8, seed=7)
    ]
    assert messages[0].prompt == PROMPT and list(messages[0].prompt_token_ids) == list(unary.prompt_token_ids)
    for m in messages:
        pieces.setdefault(m.index, []).append(m)
    for candidate in unary.candidates:
        stream = pieces[candidate.index]
        assert "".join(p.text for p in stream) == candidate.text
        assert [t for p in stream for t in p.token_ids] == list(candidate.token_ids)
        assert stream[-1].finish_reason == candidate.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
        assert all(p.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED for p in stream[:-1])


async def test_seeded_sampling_is_reproducible(client: AsyncInferenceClient) -> None:
    first = await client.generate(prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=1)
    again = await client.generate(prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=1)
    other = await client.generate(prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=2)
    ids = [list(c.token_ids) for c in first.candidates]
    assert len(ids) == 3 and [c.index for c in first.candidates] == [0, 1, 2]
    assert ids == [list(c.token_ids) for c in again.candidates]
    assert ids != [list(c.token_ids) for c in other.candidates]


async def test_stop_strings_end_a_candidate(client: AsyncInferenceClient) -> None:
    free = (await client.generate(prompt=PROMPT, max_tokens=16, model="gpt2")).candidates[0]
    word = next(w for w in free.text.split() if len(w) > 1)
    stopped = (await client.generate(prompt=PROMPT, max_tokens=16, model="gpt2", stop=[word])).candidates[0]
    assert stopped.finish_reason == inference_pb2.STOP
    assert stopped.text == free.text[: free.text.index(word)]
    assert word not in stopped.text


async def test_score_equals_generate_logprobs_and_saliency(
    client: AsyncInferenceClient,
    run_saliency_server,
    tiny_chat_llama_dir: Path,  # type: ignore[no-untyped-def]
) -> None:
    generated = await client.generate(prompt=PROMPT, max_tokens=8)
    candidate = generated.candidates[0]
    scored = await client.score(prompt=PROMPT, targets=[list(candidate.token_ids), " on the mat"])
    np.testing.assert_allclose(scored.scores[0].logprobs, candidate.logprobs, atol=1e-4)
    assert scored.scores[0].total_logprob == pytest.approx(sum(candidate.logprobs), abs=1e-3)
    assert len(scored.scores[1].logprobs) == len(scored.scores[1].token_ids) > 0
    settings = SaliencySettings(models=[f"tiny={tiny_chat_llama_dir}"])
    async with run_saliency_server(settings) as srv, AsyncSaliencyClient(srv.address) as saliency:
        explained = await saliency.saliency(
            prompt=generated.prompt, target_token_ids=list(candidate.token_ids)
        )
    assert [t.id for t in explained.tokens] == list(generated.prompt_token_ids) + list(candidate.token_ids)
    np.testing.assert_allclose(explained.target_token_logprobs, scored.scores[0].logprobs, atol=1e-4)


async def test_chat_template_returns_the_templated_prompt(client: AsyncInferenceClient) -> None:
    response = await client.generate(
        prompt="Hi there", use_chat_template=True, system_prompt="Be brief.", max_tokens=4
    )
    assert response.prompt == "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n"
    tokens = await client.tokenize(response.prompt)
    assert [t.id for t in tokens.tokens] == list(response.prompt_token_ids)
    assert [t.special for t in tokens.tokens].count(True) == 1  # one BOS, not two


async def test_concurrent_requests_all_complete(client: AsyncInferenceClient) -> None:
    responses = await asyncio.gather(
        *[client.generate(prompt=f"{PROMPT} {i}", max_tokens=6) for i in range(8)]
    )
    assert all(len(r.candidates) == 1 and r.candidates[0].token_ids for r in responses)


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"prompt": ""}, errors.InvalidArgumentError, "prompt"),
        ({"prompt": "x", "n": 99, "temperature": 1.0}, errors.InvalidArgumentError, "n"),
        ({"prompt": "x", "n": 3}, errors.InvalidArgumentError, "n"),
        ({"prompt": "x", "max_tokens": -1}, errors.InvalidArgumentError, "max_tokens"),
        ({"prompt": "x", "max_tokens": 10**6}, errors.InvalidArgumentError, "max_tokens"),
        ({"prompt": "x", "temperature": 2.5}, errors.InvalidArgumentError, "temperature"),
        ({"prompt": "x", "top_p": 1.5}, errors.InvalidArgumentError, "top_p"),
        ({"prompt": "x", "top_k": -2}, errors.InvalidArgumentError, "top_k"),
        ({"prompt": "x", "stop": [""]}, errors.InvalidArgumentError, "stop"),
        ({"prompt": "x", "system_prompt": "s"}, errors.InvalidArgumentError, "system_prompt"),
        ({"prompt": "x", "model": "nope"}, errors.NotFoundError, "model"),
        ({"prompt": "word " * 3000}, errors.InvalidArgumentError, "prompt"),
        (
            {"prompt": "x", "use_chat_template": True, "model": "gpt2"},
            errors.InvalidArgumentError,
            "use_chat_template",
        ),
    ],
)
async def test_bad_generate_requests(
    client: AsyncInferenceClient, kwargs: dict, error: type, field: str
) -> None:
    with pytest.raises(error) as caught:
        await client.generate(**kwargs)
    assert caught.value.field == field and field.split("[")[0] in str(caught.value)
    assert (await client.generate(prompt="ok", max_tokens=2)).candidates  # still serving


async def test_bad_score_requests(client: AsyncInferenceClient) -> None:
    with pytest.raises(errors.InvalidArgumentError) as caught:
        await client.score(prompt="x", targets=[])
    assert caught.value.field == "targets"
    with pytest.raises(errors.InvalidArgumentError) as caught:
        await client.score(prompt="x", targets=[[10**7]])
    assert caught.value.field == "targets[0].token_ids"


async def test_list_models(client: AsyncInferenceClient) -> None:
    models = (await client.list_models()).models
    assert [m.id for m in models] == ["tiny", "gpt2"] and models[0].is_default
    assert models[0].architecture == "LlamaForCausalLM" and models[0].dtype == "float32"
    assert models[0].max_tokens > 0 and models[0].revision


async def test_score_refuses_what_cannot_fit_before_tokenising(client: AsyncInferenceClient) -> None:
    from inference_server.serving import MAX_SCORE_TARGETS

    with pytest.raises(errors.InvalidArgumentError) as many:
        await client.score(prompt=PROMPT, targets=[" on"] * (MAX_SCORE_TARGETS + 1))
    assert many.value.field == "targets" and str(MAX_SCORE_TARGETS) in many.value.message
    for target in ("a" * 1_000_000, [5] * 5_000):
        with pytest.raises(errors.InvalidArgumentError) as big:
            await client.score(prompt=PROMPT, targets=[" on", target])
        assert big.value.field == "targets[1]" and "context" in big.value.message
    ok = await client.score(prompt=PROMPT, targets=[" on"] * MAX_SCORE_TARGETS)
    assert len(ok.scores) == MAX_SCORE_TARGETS
