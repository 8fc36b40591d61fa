"""16,384 tokens through the saliency server, on a tiny Llama with a 32k context.

The default model's context is 8k; the long-prompts issue's stretch goal is 16k. A tiny model
(2 layers, hidden 64) with ``max_position_embeddings = 32768`` stands in for a long-context
model: the request must be admitted by default (the limit is the model's context), run
checkpointed (``auto`` from 1,024 tokens) and still carry gradient back to the first prompt token.
That checkpointed and plain passes agree is checked at short lengths in test_checkpointing.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from test_grpc_saliency import make_settings, scores_of
from tiny_models import build_config, build_tokenizer

from seqsal.client import AsyncSaliencyClient
from seqsal.v1 import common_pb2

if TYPE_CHECKING:
    from conftest import RunningSaliencyServer, SaliencyServerFactory

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the servers run on the session loop

CONTEXT = 32768
PROMPT_TOKENS = 16384
TARGET = " The answer is here."


@pytest.fixture(scope="module")
def long_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("long-llama")
    tokenizer = build_tokenizer("llama")
    tokenizer.model_max_length = CONTEXT
    config = build_config("llama", tokenizer)
    config.max_position_embeddings = CONTEXT
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(16384)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def long_prompt(tokenizer_dir: Path) -> str:
    """Text of at least PROMPT_TOKENS tokens with the tiny tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    sentence = "The quick brown fox jumps over the lazy dog, and the cat sleeps. "
    repeats = PROMPT_TOKENS // len(tokenizer(sentence)["input_ids"])
    while len(tokenizer(sentence * repeats)["input_ids"]) < PROMPT_TOKENS:
        repeats += 16
    return sentence * repeats


@pytest.fixture(scope="module")
async def long_srv(
    run_saliency_server: SaliencyServerFactory, long_llama_dir: Path
) -> AsyncIterator[RunningSaliencyServer]:
    async with run_saliency_server(make_settings([f"long={long_llama_dir}"])) as running:
        yield running


async def test_a_16k_token_request_runs_checkpointed_by_default(
    long_srv: RunningSaliencyServer, long_llama_dir: Path
) -> None:
    async with AsyncSaliencyClient(long_srv.address, timeout=600.0) as client:
        (info,) = (await client.list_models()).models
        assert info.max_tokens == CONTEXT  # no SEQSAL_MAX_TOKENS: the model's context
        response = await client.saliency(
            prompt=long_prompt(long_llama_dir), target=TARGET, methods=[common_pb2.GRAD_L2]
        )
    prompt_tokens = [t for t in response.tokens if t.part == common_pb2.PROMPT]
    assert len(prompt_tokens) >= PROMPT_TOKENS
    assert long_srv.serving.host.get("").engine.last_checkpointing == "keep_attention"
    assert np.isfinite(response.target_logprob) and response.target_logprob < 0
    scores = scores_of(response)[common_pb2.GRAD_L2]
    assert np.isfinite(scores).all()
    assert scores[0] > 0 and (scores[: len(prompt_tokens)] > 0).mean() > 0.99  # the gradient reaches back
