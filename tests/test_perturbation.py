"""OCCLUSION, LIME, Verify and the batched Score, on tiny random models through real gRPC servers.

Every number is checked against an independent computation: plain forward passes of the model
loaded here (``reference_logprob``), or a planted linear effect for LIME's fit.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch

from inference_server.settings import InferenceSettings
from saliency_server import perturbation
from saliency_server.settings import SaliencySettings
from seqsal.client import AsyncInferenceClient, AsyncSaliencyClient, perturbation_options
from seqsal.errors import InvalidArgumentError
from seqsal.v1 import common_pb2, saliency_pb2
from server_kit.model_registry import load_causal_lm

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "The fox is quick. Paris is the capital of France. Rome is old.\nThe capital of France is"
TARGET = " Paris."
SENTENCES = common_pb2.SENTENCES


S = TypeVar("S", SaliencySettings, InferenceSettings)


def settings(model_dir: Path, *, cls: type[S] = SaliencySettings, **overrides: Any) -> S:  # type: ignore[assignment]
    values: dict[str, Any] = {
        "models": [f"tiny={model_dir}"],
        "port": 0,
        "device": "cpu",
        "dtype": "float32",
        "redis_url": None,
        "backend": "transformers",
        "metrics_port": 0,
    }
    return cls(_env_file=None, **(values | overrides))  # type: ignore[call-arg]


@pytest.fixture(scope="module")
async def inference(run_inference_server, tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    async with run_inference_server(settings(tiny_llama_dir, cls=InferenceSettings)) as srv:
        yield srv


@pytest.fixture(scope="module")
async def local(run_saliency_server, tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    """A saliency server without an inference server: it scores in its own process."""
    async with run_saliency_server(settings(tiny_llama_dir)) as srv:
        yield srv


@pytest.fixture(scope="module")
async def remote(run_saliency_server, tiny_llama_dir: Path, inference):  # type: ignore[no-untyped-def]
    """A saliency server that scores through the inference server's Score RPC."""
    async with run_saliency_server(settings(tiny_llama_dir, score_address=inference.address)) as srv:
        yield srv


@pytest.fixture(scope="module")
async def client(local) -> AsyncIterator[AsyncSaliencyClient]:  # type: ignore[no-untyped-def]
    async with AsyncSaliencyClient(local.address) as c:
        yield c


@pytest.fixture(scope="module")
def model(tiny_llama_dir: Path) -> Any:
    return load_causal_lm(tiny_llama_dir, torch.device("cpu"), torch.float32)


def reference_logprob(model: Any, prompt_ids: Sequence[int], target_ids: Sequence[int]) -> float:
    """sum of log p(target | prompt) from one plain forward pass."""
    ids = torch.tensor([[*prompt_ids, *target_ids]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].double()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt_ids) :, None])
    return float(lp.sum())


def ids_of(response: saliency_pb2.SaliencyResponse, part: int) -> list[int]:
    return [t.id for t in response.tokens if t.part == part]


def without(response: saliency_pb2.SaliencyResponse, segments: Sequence[saliency_pb2.Segment]) -> list[int]:
    """The prompt's ids without the non-special tokens of ``segments``."""
    gone = {j for s in segments for j in range(s.token_start, s.token_end) if not response.tokens[j].special}
    return [t.id for j, t in enumerate(response.tokens) if t.part == common_pb2.PROMPT and j not in gone]


def prompt_segments(response: saliency_pb2.SaliencyResponse) -> list[common_pb2.Segment]:
    return [
        s
        for s in response.segments
        if s.part == common_pb2.PROMPT
        and any(not response.tokens[j].special for j in range(s.token_start, s.token_end))
    ]


async def wait_for(condition: Any, what: str, timeout_s: float = 120.0) -> None:
    """Poll ``condition()`` until true (the bound only catches a hang)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_occlusion_equals_the_log_prob_differences_of_the_removed_segments(
    client: AsyncSaliencyClient, model: Any
) -> None:
    response = await client.saliency(
        prompt=PROMPT, target=TARGET, methods=[common_pb2.OCCLUSION], granularity=SENTENCES
    )
    prompt_ids, target_ids = ids_of(response, common_pb2.PROMPT), ids_of(response, common_pb2.TARGET)
    full = reference_logprob(model, prompt_ids, target_ids)
    assert response.target_logprob == pytest.approx(full, abs=1e-4)
    segments = prompt_segments(response)
    assert len(segments) == 4
    for segment in segments:
        expected = full - reference_logprob(model, without(response, [segment]), target_ids)
        assert segment.scores[0] == pytest.approx(expected, abs=1e-4), segment.text
    scores = response.scores[0]
    assert scores.perturbations == 4 and not scores.HasField("r2")
    assert "saliency server" in scores.scored_by and "no inference server" in scores.scored_by
    # special tokens (BOS) and target tokens score 0; a segment's effect is spread over its tokens
    for token, score in zip(response.tokens, scores.scores, strict=True):
        if token.special or token.part == common_pb2.TARGET:
            assert score == 0.0


async def test_occlusion_with_a_filler_and_a_selection(client: AsyncSaliencyClient, model: Any) -> None:
    filler = " ..."
    response = await client.saliency(
        prompt=PROMPT,
        target=TARGET,
        target_spans=[(0, 6)],  # " Paris" only
        methods=[common_pb2.OCCLUSION],
        granularity=SENTENCES,
        perturbation=perturbation_options(filler=filler),
    )
    tokens = await client.tokenize(filler, as_target=True)
    filler_ids = [t.id for t in tokens.tokens]
    mask = list(response.target_mask)
    target_ids = ids_of(response, common_pb2.TARGET)
    selected = [t for t, m in zip(target_ids, mask, strict=True) if m]
    assert 0 < len(selected) < len(target_ids)
    prompt_ids = ids_of(response, common_pb2.PROMPT)
    full = reference_logprob(model, prompt_ids, selected)
    segment = prompt_segments(response)[1]
    own = [j for j in range(segment.token_start, segment.token_end) if not response.tokens[j].special]
    replaced = prompt_ids[: own[0]] + filler_ids + prompt_ids[own[-1] + 1 :]
    # the selection's prefix of the target: the selected tokens come first here
    assert mask[: len(selected)] == [True] * len(selected)
    assert segment.scores[0] == pytest.approx(full - reference_logprob(model, replaced, selected), abs=1e-4)


async def test_lime_recovers_a_planted_linear_effect() -> None:
    rng = np.random.default_rng(7)
    n = 6
    planted = rng.normal(size=n) * 2.0
    masks = np.vstack([np.ones((1, n), dtype=bool), perturbation.lime_masks(n, 200, seed=3)])
    objective = -5.0 + masks.astype(float) @ planted  # a scorer that is exactly linear
    fit = perturbation.lime_fit(masks, objective, alpha=1e-6)
    np.testing.assert_allclose(fit.effects, planted, atol=1e-4)
    assert fit.intercept == pytest.approx(-5.0, abs=1e-4)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    noisy = perturbation.lime_fit(masks, objective + rng.normal(size=len(objective)), alpha=1e-6)
    assert 0.0 < noisy.r2 < 1.0
    np.testing.assert_array_equal(
        perturbation.lime_masks(n, 50, seed=3), perturbation.lime_masks(n, 50, seed=3)
    )
    assert not np.array_equal(perturbation.lime_masks(n, 50, seed=3), perturbation.lime_masks(n, 50, seed=4))


async def test_lime_is_reproducible_with_a_seed_and_a_cache_hit_is_identical(local, client) -> None:  # type: ignore[no-untyped-def]
    def request(seed: int) -> dict[str, Any]:
        return {
            "prompt": PROMPT,
            "target": TARGET,
            "methods": [common_pb2.LIME, common_pb2.OCCLUSION],
            "granularity": SENTENCES,
            "perturbation": perturbation_options(samples=24, seed=seed),
        }

    first = await client.saliency(**request(5))
    assert not first.cache_hit
    lime = first.scores[0]
    assert lime.method == common_pb2.LIME and lime.perturbations == 24 and lime.HasField("r2")
    assert lime.r2 <= 1.0
    hit = await client.saliency(**request(5))
    assert hit.cache_hit
    assert [list(s.scores) for s in hit.scores] == [list(s.scores) for s in first.scores]
    assert hit.scores[0].r2 == lime.r2 and hit.scores[0].scored_by == lime.scored_by
    local.serving.cache.clear()
    again = await client.saliency(**request(5))
    assert not again.cache_hit
    np.testing.assert_allclose(again.scores[0].scores, lime.scores, atol=1e-6)
    other = await client.saliency(**request(6))
    assert not other.cache_hit  # the seed is part of the key
    assert list(other.scores[0].scores) != list(lime.scores)
    # OCCLUSION does not depend on LIME's seed: the same entry
    assert list(other.scores[1].scores) == list(first.scores[1].scores)


async def test_batched_score_of_many_prompts_equals_one_by_one(inference, model: Any) -> None:  # type: ignore[no-untyped-def]
    async with AsyncInferenceClient(inference.address) as client:
        base = await client.tokenize(PROMPT)
        ids = [t.id for t in base.tokens]
        prompts = [ids, ids[:-3], ids[:1] + ids[5:], ids[:8], ids[2:]]
        targets = [" Paris.", [11, 12, 13]]
        batched = await client.score(prompt_token_ids=prompts, targets=targets)
        assert len(batched.scores) == len(prompts) * len(targets)
        assert batched.prompt == "" and not batched.prompt_token_ids
        for p, prompt in enumerate(prompts):
            one = await client.score(prompt_token_ids=[prompt], targets=targets)
            for t in range(len(targets)):
                row = batched.scores[p * len(targets) + t]
                assert row.prompt_index == p
                np.testing.assert_allclose(row.logprobs, one.scores[t].logprobs, atol=1e-5)
                reference = reference_logprob(model, prompt, list(row.token_ids))
                assert row.total_logprob == pytest.approx(reference, abs=1e-4)
        text = await client.score(prompt=PROMPT, targets=targets)
        np.testing.assert_allclose(text.scores[0].logprobs, batched.scores[0].logprobs, atol=1e-5)


async def test_the_fallback_gives_the_inference_servers_numbers(remote, client) -> None:  # type: ignore[no-untyped-def]
    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "target": TARGET,
        "methods": [common_pb2.OCCLUSION, common_pb2.LIME],
        "granularity": common_pb2.WORDS,
        "perturbation": perturbation_options(samples=16, seed=1),
    }
    async with AsyncSaliencyClient(remote.address) as through:
        scored = await through.saliency(**kwargs)
    here = await client.saliency(**kwargs)
    for a, b in zip(scored.scores, here.scores, strict=True):
        assert a.scored_by.startswith("inference server 127.0.0.1:")
        assert b.scored_by.startswith("saliency server (transformers")
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    assert scored.scores[1].r2 == pytest.approx(here.scores[1].r2, abs=1e-4)


async def test_all_segments_with_perturbation_methods_equal_single_calls(client: AsyncSaliencyClient) -> None:
    stream = [
        m
        async for m in client.saliency_all_segments(
            prompt=PROMPT,
            target=" Paris. Rome.",
            methods=[common_pb2.OCCLUSION, common_pb2.GRAD_L2],
            granularity=common_pb2.WORDS,
        )
    ]
    assert len(stream) == stream[0].segment_count >= 2
    for message in stream:
        single = await client.saliency(
            prompt=PROMPT,
            target=" Paris. Rome.",
            target_mask=list(message.saliency.target_mask),
            methods=[common_pb2.OCCLUSION, common_pb2.GRAD_L2],
            granularity=common_pb2.WORDS,
        )
        assert single.cache_hit
        np.testing.assert_array_equal(single.scores[0].scores, message.saliency.scores[0].scores)


async def test_verify_against_direct_rescoring(client: AsyncSaliencyClient, model: Any) -> None:
    result = await client.verify(
        prompt=PROMPT,
        target=TARGET,
        methods=[common_pb2.GRAD_DOT_INPUT],
        granularity=SENTENCES,
        random_draws=5,
        seed=3,
    )
    explanation = result.saliency
    prompt_ids, target_ids = ids_of(explanation, common_pb2.PROMPT), ids_of(explanation, common_pb2.TARGET)
    full = reference_logprob(model, prompt_ids, target_ids)
    assert result.full_logprob == pytest.approx(full, abs=1e-4)
    segments = prompt_segments(explanation)
    assert result.removable_segments == len(segments) == 4
    assert [s.k for s in result.steps] == [1, 2, 3]  # k = 5 > 4 segments is left out
    assert result.perturbations == 3 * (2 + 5)
    # the ranking follows the explanation's segment scores
    ranked = sorted(range(len(segments)), key=lambda i: -segments[i].scores[0])
    position = [list(explanation.segments).index(s) for s in segments]
    by_subset = {}
    for k in (1, 2, 3):
        for subset in itertools.combinations(range(len(segments)), k):
            removed = without(explanation, [segments[i] for i in subset])
            by_subset[subset] = full - reference_logprob(model, removed, target_ids)
    for step in result.steps:
        assert list(step.segment_indices) == [position[i] for i in ranked[: step.k]]
        top = tuple(sorted(ranked[: step.k]))
        assert step.topk_drop == pytest.approx(by_subset[top], abs=1e-4)
        assert step.topk_removed_logprob == pytest.approx(full - by_subset[top], abs=1e-4)
        assert list(step.ablated_prompt_token_ids) == without(explanation, [segments[i] for i in top])
        kept = without(explanation, [s for i, s in enumerate(segments) if i not in top])
        assert step.topk_only_logprob == pytest.approx(reference_logprob(model, kept, target_ids), abs=1e-4)
        assert len(step.random_drops) == 5
        possible = [v for subset, v in by_subset.items() if len(subset) == step.k]
        for drop in step.random_drops:  # each draw is one k-subset's drop
            assert min(abs(drop - v) for v in possible) < 1e-4
        assert step.random_drop_mean == pytest.approx(np.mean(step.random_drops))
        assert step.random_drop_std == pytest.approx(np.std(step.random_drops))
        removed = "".join(segments[i].text for i in top)
        assert len(step.ablated_prompt) == len(PROMPT) - len(removed)
    first = segments[ranked[0]]
    assert result.steps[0].ablated_prompt == PROMPT[: first.char_start] + PROMPT[first.char_end :]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"perturbation": perturbation_options(samples=100_000)}, "perturbation.samples"),
        ({"perturbation": perturbation_options(ridge_alpha=-1.0)}, "perturbation.ridge_alpha"),
        ({"granularity": common_pb2.TOKENS, "prompt": "word " * 300}, "granularity"),
    ],
)
async def test_bad_perturbation_requests_name_the_field(
    run_saliency_server, tiny_llama_dir: Path, kwargs: dict[str, Any], field: str
) -> None:  # type: ignore[no-untyped-def]
    request = {
        "prompt": PROMPT,
        "target": TARGET,
        "methods": [common_pb2.OCCLUSION, common_pb2.LIME],
        "granularity": SENTENCES,
    } | kwargs
    async with (
        run_saliency_server(settings(tiny_llama_dir, max_perturbations=256)) as srv,
        AsyncSaliencyClient(srv.address) as client,
    ):
        with pytest.raises(InvalidArgumentError) as caught:
            await client.saliency(**request)
    assert caught.value.field == field
    assert "256" in caught.value.message or field != "granularity"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"methods": [common_pb2.GRAD_L2, common_pb2.OCCLUSION]}, "problem.methods"),
        ({"granularity": common_pb2.GRANULARITY_UNSPECIFIED}, "problem.granularity"),
        ({"k": [0]}, "k"),
        ({"random_draws": 65}, "random_draws"),
    ],
)
async def test_bad_verify_requests_name_the_field(
    client: AsyncSaliencyClient, kwargs: dict[str, Any], field: str
) -> None:
    request: dict[str, Any] = {
        "prompt": PROMPT,
        "target": TARGET,
        "methods": [common_pb2.GRAD_L2],
        "granularity": SENTENCES,
    } | kwargs
    with pytest.raises(InvalidArgumentError) as caught:
        await client.verify(**request)
    assert caught.value.field == field


async def test_bad_batched_score_requests_name_the_field(inference) -> None:  # type: ignore[no-untyped-def]
    async with AsyncInferenceClient(inference.address) as client:
        cases = [
            ({"prompt": "x", "prompt_token_ids": [[1, 2]]}, "prompt"),
            ({"prompt_token_ids": [[1, 10**6]]}, "prompt_token_ids[0]"),
            ({"prompt_token_ids": [[1], []]}, "prompt_token_ids[1]"),
            ({"prompt_token_ids": [[1, 2]] * 1025}, "prompt_token_ids"),
        ]
        for kwargs, field in cases:
            with pytest.raises(InvalidArgumentError) as caught:
                await client.score(targets=[" Paris"], **kwargs)
            assert caught.value.field == field, kwargs


async def test_the_fallback_gives_way_to_clicks_and_stops_when_cancelled(
    run_saliency_server, tiny_llama_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    """In-process scoring is a scheduler ticket: a click preempts it, a cancelled call frees it."""
    import asyncio

    from saliency_server.scheduler import State

    slow = settings(tiny_llama_dir, score_batch_tokens=128, max_perturbations=4096)
    async with run_saliency_server(slow) as srv, AsyncSaliencyClient(srv.address) as client:
        scheduler = srv.serving.schedulers["tiny"]

        def lime(seed: int) -> Any:
            return client.saliency(
                prompt="word " * 40,
                target=TARGET,
                methods=[common_pb2.LIME],
                granularity=common_pb2.WORDS,
                perturbation=perturbation_options(samples=3000, seed=seed),
                priority=saliency_pb2.PRIORITY_BACKGROUND,
            )

        def running() -> list[Any]:
            return [t for t in scheduler.active() if "perturbed" in t.label and t.state is State.RUNNING]

        background = asyncio.create_task(lime(1))
        await wait_for(running, "the perturbation job to run")
        ticket = running()[0]
        click = await client.saliency(prompt=PROMPT, target=TARGET, methods=[common_pb2.GRAD_L2])
        assert click.scores and not background.done(), background
        assert ("preempt", ticket.id) in scheduler.events, scheduler.events
        background.cancel()
        await wait_for(lambda: scheduler.depth == 0, "the cancelled job to leave the scheduler")
        # it leaves as "cancel" when the handler's cancel comes first, as "finish" when its worker
        # thread saw the stream close at a checkpoint first (a loaded machine): either way, long
        # before its 3,000 samples were scored
        assert {("cancel", ticket.id), ("finish", ticket.id)} & set(scheduler.events), scheduler.events
        assert background.cancelled()


async def test_secret_word_on_the_default_model(run_saliency_server, default_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """A known answer: the prompt tells the model a secret word and asks for it back. Each
    perturbation method's top word is the secret, and removing it drops log p(target) more than
    random removals do (slow: the real default model)."""
    prompt = (
        "The secret word is banana. Remember it well.\nQuestion: What is the secret word?\n"
        "Answer: The secret word is"
    )
    async with (
        run_saliency_server(settings(default_model_dir)) as srv,
        AsyncSaliencyClient(srv.address) as client,
    ):
        for method in (common_pb2.OCCLUSION, common_pb2.LIME):
            response = await client.saliency(
                prompt=prompt,
                target=" banana",
                methods=[method],
                granularity=common_pb2.WORDS,
                perturbation=perturbation_options(samples=128, seed=0),
            )
            top = max(prompt_segments(response), key=lambda s: s.scores[0])
            assert top.text.strip(" .") == "banana", (common_pb2.Method.Name(method), top.text)
            check = await client.verify(
                prompt=prompt, target=" banana", methods=[method], granularity=common_pb2.WORDS, k=[1]
            )
            (step,) = check.steps
            assert step.topk_drop > step.random_drop_mean + 2 * step.random_drop_std


async def test_identical_perturbation_requests_in_flight_score_once(
    run_saliency_server, tiny_llama_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    """The second of two identical requests joins the first one's flight (serving.py's machinery):
    one scoring job. When the first one's client goes away, the one that joined scores itself."""
    import asyncio

    async with (
        run_saliency_server(settings(tiny_llama_dir)) as srv,
        AsyncSaliencyClient(srv.address) as client,
    ):
        serving, scoring = srv.serving, srv.serving.perturbation
        real_score, real_join = scoring.score, serving._join
        scored: list[int] = []
        joins: list[int] = []
        gate = asyncio.Event()

        async def counted_score(*args: Any, **kwargs: Any) -> Any:  # the real scorer, counted and held
            scored.append(len(args[1]))
            await gate.wait()
            return await real_score(*args, **kwargs)

        async def counted_join(*args: Any, **kwargs: Any) -> Any:
            joins.append(1)
            return await real_join(*args, **kwargs)

        scoring.score = counted_score  # type: ignore[method-assign]
        serving._join = counted_join  # type: ignore[method-assign]

        def request(seed: int) -> Any:
            return client.saliency(
                prompt=PROMPT,
                target=TARGET,
                methods=[common_pb2.OCCLUSION, common_pb2.LIME],
                granularity=SENTENCES,
                perturbation=perturbation_options(samples=12, seed=seed),
            )

        both = asyncio.gather(request(1), request(1))  # sent together
        await wait_for(lambda: len(scored) == 1 and len(joins) == 1, "one request to score, one to join")
        gate.set()
        a, b = await both
        assert len(scored) == 1 and scored[0] == 1 + 4 + 12  # the full prompt, 4 sentences, 12 samples
        assert not a.cache_hit and not b.cache_hit
        assert [list(s.scores) for s in a.scores] == [list(s.scores) for s in b.scores]
        assert not serving._inflight

        # the first client goes away while the second waits: the second scores itself
        gate.clear()
        first = asyncio.create_task(request(2))
        await wait_for(lambda: len(scored) == 2, "the first request to score")
        second = asyncio.create_task(request(2))
        await wait_for(lambda: len(joins) == 2, "the second request to join the first")
        first.cancel()
        await wait_for(lambda: len(scored) == 3, "the second request to score itself")
        gate.set()
        alone = await second
        assert [s.perturbations for s in alone.scores] == [4, 12] and not alone.cache_hit
        assert len(scored) == 3
        await wait_for(lambda: not serving._inflight, "the flights to be forgotten")


def verify_answer(response: saliency_pb2.VerifyResponse) -> saliency_pb2.VerifyResponse:
    """``response`` without what differs between two answers of one computation (times, cache hit)."""
    out = saliency_pb2.VerifyResponse()
    out.CopyFrom(response)
    out.server_time_ms = out.saliency.server_time_ms = 0.0
    out.saliency.cache_hit = False
    return out


async def test_identical_verify_calls_in_flight_score_once_and_repeats_come_from_the_cache(
    run_saliency_server, tiny_llama_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    """The second of two identical Verify calls joins the first one's computation: one scoring
    job, one answer. The same call afterwards is answered from the cache; another seed or another
    k scores again. When the first caller goes away, the one that joined scores itself."""
    import asyncio

    async with (
        run_saliency_server(settings(tiny_llama_dir)) as srv,
        AsyncSaliencyClient(srv.address) as client,
    ):
        serving, scoring = srv.serving, srv.serving.perturbation
        real_score, real_run = scoring.score, serving.verifies.run
        scored: list[int] = []
        arrived: list[int] = []  # calls that reached the in-flight table (missed the cache)
        gate = asyncio.Event()

        async def counted_score(*args: Any, **kwargs: Any) -> Any:  # the real scorer, counted and held
            scored.append(len(args[1]))
            await gate.wait()
            return await real_score(*args, **kwargs)

        async def counted_run(*args: Any, **kwargs: Any) -> Any:
            arrived.append(1)
            return await real_run(*args, **kwargs)

        scoring.score = counted_score  # type: ignore[method-assign]
        serving.verifies.run = counted_run  # type: ignore[method-assign]

        def verify(seed: int, **kwargs: Any) -> Any:
            return client.verify(
                prompt=PROMPT,
                target=TARGET,
                methods=[common_pb2.GRAD_DOT_INPUT],
                granularity=SENTENCES,
                random_draws=5,
                seed=seed,
                **kwargs,
            )

        both = asyncio.gather(verify(3), verify(3))  # sent together
        await wait_for(lambda: scored and len(arrived) == 2, "both calls to miss the cache, one to score")
        gate.set()
        a, b = await both
        assert len(scored) == 1 and scored[0] == 1 + 3 * (2 + 5)  # one job: the full prompt; k = 1, 2, 3
        assert verify_answer(a) == verify_answer(b) and len(a.steps) == 3
        assert not a.saliency.cache_hit and not b.saliency.cache_hit
        assert len(serving.verifies) == 0

        again = await verify(3)
        assert len(scored) == 1 and len(arrived) == 2  # the cache's answer
        assert verify_answer(again) == verify_answer(a) and again.saliency.cache_hit

        other = await verify(4)  # the random draws depend on the seed: part of the key
        assert len(scored) == 2
        assert [list(s.random_drops) for s in other.steps] != [list(s.random_drops) for s in a.steps]
        assert [s.topk_drop for s in other.steps] == pytest.approx([s.topk_drop for s in a.steps], abs=1e-5)
        fewer = await verify(3, k=[1])
        assert len(scored) == 3 and [s.k for s in fewer.steps] == [1]
        assert (await verify(4)).steps == other.steps and len(scored) == 3

        # the first caller goes away while the second waits for it: the second scores itself
        gate.clear()
        first = asyncio.create_task(verify(5))
        await wait_for(lambda: len(scored) == 4, "the first call to score")
        second = asyncio.create_task(verify(5))
        await wait_for(lambda: len(arrived) == 6, "the second call to join the first")
        first.cancel()
        await wait_for(lambda: len(scored) == 5 or second.done(), "the joined call to score itself")
        gate.set()
        alone = await second
        assert [s.k for s in alone.steps] == [1, 2, 3] and len(scored) == 5
        assert first.cancelled()
        assert len(serving.verifies) == 0
        assert verify_answer(await verify(5)) == verify_answer(alone) and len(scored) == 5


async def test_the_scorer_dtype_is_part_of_the_cache_key(
    run_inference_server, run_saliency_server, tiny_llama_dir: Path, remote, local
) -> None:  # type: ignore[no-untyped-def]
    """Scored by a bfloat16 inference server, a float32 one, or here in float32: three entries."""
    from dataclasses import replace

    from saliency_server.cache import get_entry
    from saliency_server.validation import resolve_selection
    from seqsal.client import saliency_request

    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "target": TARGET,
        "methods": [common_pb2.OCCLUSION],
        "granularity": SENTENCES,
        "perturbation": perturbation_options(filler=" dtype"),
    }
    async with (
        run_inference_server(settings(tiny_llama_dir, cls=InferenceSettings, dtype="bfloat16")) as bf16,
        run_saliency_server(settings(tiny_llama_dir, score_address=bf16.address)) as through_bf16,
        AsyncSaliencyClient(remote.address) as c32,
        AsyncSaliencyClient(through_bf16.address) as c16,
    ):
        a = await c32.saliency(**kwargs)
        assert (await c32.saliency(**kwargs)).cache_hit
        b = await c16.saliency(**kwargs)
        assert not b.cache_hit
        assert a.scores[0].scored_by.endswith("float32)") and b.scores[0].scored_by.endswith("bfloat16)")
        assert list(a.scores[0].scores) != list(b.scores[0].scores)  # why they must not share an entry

        request = saliency_request(**kwargs)
        keys = []
        for server in (remote, through_bf16, local):
            problem = await server.serving._problem(request, all_segments=False)
            keys.append(
                server.serving.cache_key(problem, common_pb2.OCCLUSION, resolve_selection(problem, request))
            )
        assert len(set(keys)) == 3  # inference fp32, inference bf16, in-process fp32
        # the float32 server's entry is there; a bfloat16 scorer's key does not find it
        assert await get_entry(remote.serving.cache, keys[0]) is not None
        assert await get_entry(remote.serving.cache, keys[1]) is None
        # what the scorer is called in words is not part of the key; its dtype is
        assert problem.scorer is not None
        assert (
            local.serving.cache_key(
                replace(problem, scorer=replace(problem.scorer, described="elsewhere")),
                common_pb2.OCCLUSION,
                resolve_selection(problem, request),
            )
            == keys[2]
        )
        assert (
            local.serving.cache_key(
                replace(problem, scorer=replace(problem.scorer, dtype="bfloat16")),
                common_pb2.OCCLUSION,
                resolve_selection(problem, request),
            )
            != keys[2]
        )
