"""Activation checkpointing and chunked log-probs give the plain engine's numbers, for less memory.

Every tiny architecture, every method (GRAD_L2, GRAD_DOT_INPUT, IG), with and without a foil,
one selection and batched selections (SaliencyAllSegments' path, also with more selections
than one backward takes): the checkpointed modes must equal the plain pass to float
tolerance, the model must be unchanged afterwards, and the checkpointed forward must really
keep fewer bytes for the backward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_models import ARCHITECTURES

from saliency_server.checkpointing import CheckpointPolicy, checkpointed_layers, decoder_layers
from saliency_server.engine import GradientEngine, SaliencyInputs, SaliencyResult
from saliency_server.logprobs import token_logprobs
from seqsal.errors import CancelledError
from seqsal.v1 import common_pb2
from server_kit.model_registry import load_causal_lm, load_tokenizer

L2, DOT, IG = common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT, common_pb2.INTEGRATED_GRADIENTS
ALL_METHODS = (L2, DOT, IG)
PROMPT = "Question: What is the capital of France? Answer:"
TARGET = " Paris, and the capital of Italy is Rome."
FOIL = " London."
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tiny_model_dirs: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    return {
        arch: (load_causal_lm(path, CPU, torch.float32), load_tokenizer(path))
        for arch, path in tiny_model_dirs.items()
    }


def inputs_for(tokenizer: Any, foil: str | None) -> SaliencyInputs:
    return SaliencyInputs(
        prompt_ids=tokenizer(PROMPT)["input_ids"],
        target_ids=tokenizer(TARGET, add_special_tokens=False)["input_ids"],
        foil_ids=None if foil is None else tokenizer(foil, add_special_tokens=False)["input_ids"],
    )


def selections(n_target: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    masks = rng.random((5, n_target)) < 0.5
    masks[:, 0] = True
    masks[1] = False
    masks[1][n_target // 2] = True
    return masks


def engine(model: Any, mode: str, **kwargs: Any) -> GradientEngine:
    return GradientEngine(model, checkpoint_policy=CheckpointPolicy(mode=mode), **kwargs)  # type: ignore[arg-type]


def assert_same(actual: SaliencyResult, expected: SaliencyResult) -> None:
    assert set(actual.scores) == set(expected.scores)
    for method, values in expected.scores.items():
        scale = float(np.abs(values).max()) or 1.0
        np.testing.assert_allclose(
            actual.scores[method],
            values,
            rtol=1e-5,
            atol=1e-6 * scale,
            err_msg=common_pb2.Method.Name(method),
        )
    np.testing.assert_allclose(actual.target_token_logprobs, expected.target_token_logprobs, atol=1e-6)
    assert actual.target_logprob == pytest.approx(expected.target_logprob, abs=1e-6)
    assert actual.ig_residual == pytest.approx(expected.ig_residual, abs=1e-6)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("foil", [None, FOIL])
def test_checkpointed_equals_plain(arch: str, foil: str | None, models: dict[str, tuple[Any, Any]]) -> None:
    model, tokenizer = models[arch]
    inputs = inputs_for(tokenizer, foil)
    masks = selections(len(inputs.target_ids))
    plain_engine = engine(model, "off", segment_batch_size=2)
    plain = list(plain_engine.saliency_batch(inputs, masks, ALL_METHODS, ig_steps=3))
    assert plain_engine.last_checkpointing == "off"
    for mode in ("keep_attention", "full"):
        # one selection: a single backward, so keep_attention is used as asked
        single = engine(model, mode)
        result = single.saliency(inputs, masks[0].tolist(), ALL_METHODS, ig_steps=3)
        assert single.last_checkpointing == mode
        assert_same(result, plain[0])
        # five selections, two per backward: three backwards of one forward, so always full
        batched = engine(model, mode, segment_batch_size=2)
        for got, want in zip(
            batched.saliency_batch(inputs, masks, ALL_METHODS, ig_steps=3), plain, strict=True
        ):
            assert_same(got, want)
        # the last pass was IG's: one batched backward per IG batch, keep_attention allowed
        assert batched.last_checkpointing == mode
    for layer in decoder_layers(model):
        assert "forward" not in layer.__dict__  # the model is as it was


def test_several_backwards_use_full_recomputation(models: dict[str, tuple[Any, Any]]) -> None:
    model, tokenizer = models["llama"]
    inputs = inputs_for(tokenizer, None)
    masks = selections(len(inputs.target_ids))
    auto = GradientEngine(model, checkpoint_policy=CheckpointPolicy(min_tokens=1), segment_batch_size=2)
    plain = list(engine(model, "off").saliency_batch(inputs, masks, [L2, DOT]))
    for got, want in zip(auto.saliency_batch(inputs, masks, [L2, DOT]), plain, strict=True):
        assert_same(got, want)
    assert auto.last_checkpointing == "full"
    auto.saliency(inputs, masks[0].tolist(), [L2])
    assert auto.last_checkpointing == "keep_attention"


def test_decoder_layers_found_for_every_architecture(models: dict[str, tuple[Any, Any]]) -> None:
    for arch, (model, _) in models.items():
        layers = decoder_layers(model)
        assert len(layers) == (model.config.n_layer if arch == "gpt2" else model.config.num_hidden_layers)
        assert len({type(layer) for layer in layers}) == 1


def saved_bytes(model: Any, embeds: torch.Tensor, mode: str) -> int:
    """Bytes autograd keeps for the backward of one forward pass (outside checkpointed regions)."""
    total = [0]
    seen: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and not isinstance(tensor, torch.nn.Parameter):
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return tensor

    leaf = embeds.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), checkpointed_layers(model, mode):  # type: ignore[arg-type]
        model(inputs_embeds=leaf, use_cache=False, logits_to_keep=1)
    return total[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpointing_keeps_fewer_bytes(arch: str, models: dict[str, tuple[Any, Any]]) -> None:
    """Full recomputation keeps a fraction of the plain pass's tensors (keep_attention's extra
    attention outputs live in its own store, invisible to saved-tensor hooks: the benchmark
    measures that mode's peak RSS)."""
    model, _ = models[arch]
    embeds = torch.randn(1, 256, model.config.hidden_size if arch != "gpt2" else model.config.n_embd)
    plain = saved_bytes(model, embeds, "off")
    full = saved_bytes(model, embeds, "full")
    assert 0 < full < plain / 3


def test_model_restored_when_the_computation_fails(models: dict[str, tuple[Any, Any]]) -> None:
    model, tokenizer = models["mistral"]
    inputs = inputs_for(tokenizer, None)
    checkpointed = engine(model, "full", ig_batch_size=1)
    calls = [0]

    def cancel_on_second_check() -> bool:
        calls[0] += 1
        return calls[0] > 2

    with pytest.raises(CancelledError):
        checkpointed.saliency(
            inputs, [True] * len(inputs.target_ids), ALL_METHODS, ig_steps=4, cancelled=cancel_on_second_check
        )
    for layer in decoder_layers(model):
        assert "forward" not in layer.__dict__
    with checkpointed_layers(model, "full"):
        pass
    # a forward attribute already on the instance (accelerate's hooks set one) is put back
    layer = decoder_layers(model)[0]
    sentinel = layer.forward
    layer.forward = sentinel
    try:
        with checkpointed_layers(model, "full"):
            assert layer.__dict__["forward"] is not sentinel
        assert layer.__dict__["forward"] is sentinel
    finally:
        del layer.forward


def test_auto_policy_thresholds(models: dict[str, tuple[Any, Any]]) -> None:
    config = models["llama"][0].config
    common = {"target_tokens": 8, "n_selections": 1, "dtype": torch.float32}
    plenty = CheckpointPolicy(min_tokens=100, free_bytes=lambda: 1 << 40)
    assert plenty.choose(config, tokens=99, rows=1, backward_passes=1, **common) == "off"
    assert plenty.choose(config, tokens=100, rows=1, backward_passes=1, **common) == "keep_attention"
    assert plenty.choose(config, tokens=50, rows=2, backward_passes=3, **common) == "full"
    short = CheckpointPolicy(min_tokens=100, free_bytes=lambda: 1 << 20)  # 1 MiB free: checkpoint anyway
    assert short.choose(config, tokens=20, rows=1, backward_passes=1, **common) == "keep_attention"
    unknown = CheckpointPolicy(min_tokens=100, free_bytes=lambda: None)
    assert unknown.choose(config, tokens=20, rows=1, backward_passes=1, **common) == "off"
    assert (
        CheckpointPolicy(mode="off").choose(config, tokens=10**6, rows=1, backward_passes=1, **common)
        == "off"
    )
    assert (
        CheckpointPolicy(mode="full").choose(config, tokens=2, rows=1, backward_passes=1, **common) == "full"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_token_logprobs_equal_log_softmax(dtype: torch.dtype, chunk: int) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 50, generator=generator) * 4).to(dtype).requires_grad_(True)
    ids = torch.randint(0, 50, (2, 7), generator=generator)
    got = token_logprobs(logits, ids, chunk=chunk)
    upcast = logits.double() if dtype == torch.float64 else logits.float()
    want = torch.log_softmax(upcast, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    weights = torch.randn(2, 7, generator=generator)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), logits)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), logits)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-5)
