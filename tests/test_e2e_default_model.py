"""End to end on the real default model (SmolLM2-135M-Instruct) through a real gRPC server."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch

from saliency_server.server import build_server, build_serving
from saliency_server.settings import SaliencySettings
from seqsal.client import AsyncSaliencyClient
from seqsal.v1 import common_pb2
from server_kit.model_registry import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.slow

PROMPT = (
    "Taste-likes: Cheese\nTaste-dislikes: Can't eat eggs\nSuggestion: Quiche Lorraine\n"
    "Analysis: A savoury tart with cheese and eggs\nRecommendation:"
)


@pytest.fixture(scope="module")
async def client(default_model_dir: Path) -> AsyncIterator[AsyncSaliencyClient]:
    settings = SaliencySettings(models=[f"SmolLM2-135M-Instruct={default_model_dir}"], port=0)
    serving = build_serving(settings)
    server = build_server(serving, settings)
    port = server.bind("127.0.0.1", 0)
    await server.start()
    async with AsyncSaliencyClient(f"127.0.0.1:{port}") as c:
        yield c
    await server.stop(0)


async def test_generated_answer_is_explained(client: AsyncSaliencyClient, default_model_dir: Path) -> None:
    """Generate greedily with transformers, explain the generated ids, check log-probs and scores."""
    tokenizer = load_tokenizer(default_model_dir)
    model = load_causal_lm(default_model_dir, torch.device("cpu"), torch.float32)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert prompt_ids[0] != tokenizer.bos_token_id or tokenizer.bos_token_id is None  # SmolLM2 adds no BOS
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=8,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.eos_token_id,
        )
    new_ids = generated.sequences[0, len(prompt_ids) :].tolist()
    expected_lp = [
        float(torch.log_softmax(step[0].float(), -1)[token])
        for step, token in zip(generated.scores, new_ids, strict=True)
    ]

    response = await client.saliency(
        prompt=PROMPT,
        target_token_ids=new_ids,
        methods=[common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT],
        granularity=common_pb2.LINES,
    )
    assert response.model == "SmolLM2-135M-Instruct" and response.dtype == "float32"
    assert [t.id for t in response.tokens] == prompt_ids + new_ids
    assert "".join(t.text for t in response.tokens if t.part == common_pb2.TARGET) == tokenizer.decode(
        new_ids, skip_special_tokens=True
    )
    np.testing.assert_allclose(response.target_token_logprobs, expected_lp, atol=2e-3)
    assert math.isclose(response.target_logprob, sum(expected_lp), abs_tol=1e-2)
    l2 = np.asarray(response.scores[0].scores)
    assert np.all(np.isfinite(l2)) and l2[: len(prompt_ids)].min() > 0
    assert l2[-1] == 0.0  # at/after the last selected position
    lines = [s.text for s in response.segments if s.part == common_pb2.PROMPT]
    assert lines[0] == "Taste-likes: Cheese\n" and lines[-1] == "Recommendation:"


async def test_all_segments_then_clicks_hit_the_cache(client: AsyncSaliencyClient) -> None:
    target = " Not for you. It contains eggs."
    messages = [
        m
        async for m in client.saliency_all_segments(
            prompt=PROMPT, target=target, granularity=common_pb2.SENTENCES
        )
    ]
    assert [m.target_segment.text for m in sorted(messages, key=lambda m: m.segment_index)] == [
        " Not for you.",
        " It contains eggs.",
    ]
    second = sorted(messages, key=lambda m: m.segment_index)[1]
    click = await client.saliency(
        prompt=PROMPT,
        target=target,
        target_mask=list(second.saliency.target_mask),
        granularity=common_pb2.SENTENCES,
    )
    assert click.cache_hit
    assert list(click.scores[1].scores) == list(second.saliency.scores[1].scores)
