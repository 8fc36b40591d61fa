"""GradientEngine against independent autograd, finite differences and its own contracts.

Every reference value here is computed in the test itself, from the model alone: full logits,
``log_softmax``, the selected positions summed, ``torch.autograd.grad`` with respect to the
output of ``model.get_input_embeddings()``. The engine's batching, ``logits_to_keep``, foil
padding and batched backward must not change the numbers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_models import ARCHITECTURES

from saliency_server.engine import GradientEngine, SaliencyInputs, SaliencyResult, ig_schedule
from seqsal.errors import CancelledError
from seqsal.v1 import common_pb2
from server_kit.model_registry import load_causal_lm, load_tokenizer

L2 = common_pb2.GRAD_L2
DOT = common_pb2.GRAD_DOT_INPUT
IG = common_pb2.INTEGRATED_GRADIENTS
ALL_METHODS = (L2, DOT, IG)

PROMPT = "The capital of France is"
TARGET = " Paris, and the capital of Italy is Rome."
FOIL_SHORT = " London."  # fewer tokens than TARGET: the foil row is padded
FOIL_LONG = " Berlin, and the capital of Spain is Madrid, not London."  # more: the target row is padded

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Loaded:
    model: Any
    tokenizer: Any
    path: Path


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs: dict[str, Path]) -> dict[str, Loaded]:
    return {
        arch: Loaded(load_causal_lm(path, CPU, torch.float32), load_tokenizer(path), path)
        for arch, path in tiny_model_dirs.items()
    }


def problem(tokenizer: Any, foil: str | None = None, target: str = TARGET) -> SaliencyInputs:
    """Token ids as the spec says: prompt with special tokens, target / foil alone without."""
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    foil_ids = None if foil is None else tokenizer(foil, add_special_tokens=False)["input_ids"]
    return SaliencyInputs(prompt_ids=prompt_ids, target_ids=target_ids, foil_ids=foil_ids)


def random_mask(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = rng.random(n) < 0.5
    mask[rng.integers(n)] = True
    return mask


# --- independent reference computations ------------------------------------------------------------


def framed(inputs: SaliencyInputs, mask: np.ndarray) -> tuple[SaliencyInputs, np.ndarray]:
    """The problem a selection poses: with a foil, the target before the first selected token is
    the context the target and the foil share (it joins the prompt); without one, as given."""
    mask = np.asarray(mask, dtype=bool)
    if inputs.foil_ids is None:
        return inputs, mask
    a = int(np.flatnonzero(mask)[0])
    prompt = [*inputs.prompt_ids, *inputs.target_ids[:a]]
    return SaliencyInputs(prompt, inputs.target_ids[a:], inputs.foil_ids), mask[a:]


def embed(model: Any, ids: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor([list(ids)])).squeeze(0)


def tail_logprobs(model: Any, embeds: torch.Tensor, ids: Sequence[int], n_prompt: int) -> torch.Tensor:
    """log p(x_t | x_<t) for t = n_prompt .. T-1, from full logits of one unpadded row."""
    logits = model(inputs_embeds=embeds.unsqueeze(0), use_cache=False).logits[0]
    log_probs = torch.log_softmax(logits, dim=-1)
    tail = torch.tensor(list(ids[n_prompt:]))
    return log_probs[n_prompt - 1 : len(ids) - 1].gather(-1, tail.unsqueeze(-1)).squeeze(-1)


def objective(
    model: Any,
    inputs: SaliencyInputs,
    mask: np.ndarray,
    prompt_embeds: torch.Tensor,
    target_embeds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L (and the target's token log-probs) for given prompt/target embeddings, foil subtracted."""
    prompt = list(inputs.prompt_ids)
    n_prompt = len(prompt)
    target_lp = tail_logprobs(
        model, torch.cat([prompt_embeds, target_embeds]), prompt + list(inputs.target_ids), n_prompt
    )
    weights = torch.tensor(mask, dtype=target_lp.dtype)
    value = (weights * target_lp).sum()
    if inputs.foil_ids is not None:
        foil_embeds = embed(model, inputs.foil_ids)
        foil_lp = tail_logprobs(
            model, torch.cat([prompt_embeds, foil_embeds]), prompt + list(inputs.foil_ids), n_prompt
        )
        value = value - foil_lp.sum()
    return value, target_lp


@dataclass(frozen=True)
class Reference:
    grad: torch.Tensor  # dL/de for the explained tokens (whole sequence, or the prompt with a foil)
    embeds: torch.Tensor  # e for the same tokens
    value: float  # L(x)
    target_token_logprobs: np.ndarray


def reference(model: Any, inputs: SaliencyInputs, mask: np.ndarray, *, scale: float = 1.0) -> Reference:
    """Independent dL/de at ``scale * e`` (only the prompt is scaled and explained with a foil)."""
    inputs, mask = framed(inputs, mask)
    n_prompt = len(inputs.prompt_ids)
    full = embed(model, list(inputs.prompt_ids) + list(inputs.target_ids))
    if inputs.foil_ids is None:
        leaf = (full * scale).detach().requires_grad_(True)
        value, target_lp = objective(model, inputs, mask, leaf[:n_prompt], leaf[n_prompt:])
    else:
        leaf = (full[:n_prompt] * scale).detach().requires_grad_(True)
        value, target_lp = objective(model, inputs, mask, leaf, full[n_prompt:])
    (grad,) = torch.autograd.grad(value, leaf)
    return Reference(
        grad=grad.detach(),
        embeds=full if inputs.foil_ids is None else full[:n_prompt],
        value=value.item(),
        target_token_logprobs=target_lp.detach().double().numpy(),
    )


def padded(values: torch.Tensor, total: int) -> np.ndarray:
    out = np.zeros(total, dtype=np.float64)
    out[: len(values)] = values.detach().double().numpy()
    return out


def expected_scores(ref: Reference, inputs: SaliencyInputs, mask: np.ndarray) -> dict[int, np.ndarray]:
    """GRAD_L2 / GRAD_DOT_INPUT from a reference gradient, zeroed where the spec says."""
    inputs, mask = framed(inputs, mask)
    total = inputs.total_tokens
    l2 = padded(ref.grad.norm(dim=-1), total)
    dot = padded((ref.grad * ref.embeds).sum(-1), total)
    limit = len(inputs.prompt_ids)
    if inputs.foil_ids is None:
        limit += int(np.flatnonzero(mask)[-1])
    l2[limit:] = 0.0
    dot[limit:] = 0.0
    return {L2: l2, DOT: dot}


def assert_scores_close(actual: np.ndarray, expected: np.ndarray, *, rtol: float = 1e-4) -> None:
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale + 1e-7)


# --- 1. the premise ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inputs_embeds_reproduce_input_ids_logits(arch: str, loaded: dict[str, Loaded]) -> None:
    model, tokenizer = loaded[arch].model, loaded[arch].tokenizer
    inputs = problem(tokenizer)
    ids = list(inputs.prompt_ids) + list(inputs.target_ids)
    engine = GradientEngine(model)
    torch.testing.assert_close(engine.embed(ids), embed(model, ids), rtol=0, atol=0)
    # e is the embedding module's output: Gemma's sqrt(hidden) scale is in it, GPT-2's positions are not.
    table = model.get_input_embeddings().weight[ids]
    scale = model.config.hidden_size**0.5 if arch == "gemma" else 1.0
    torch.testing.assert_close(engine.embed(ids), table * scale, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        from_ids = model(input_ids=torch.tensor([ids]), use_cache=False).logits
        from_embeds = model(inputs_embeds=embed(model, ids).unsqueeze(0), use_cache=False).logits
    torch.testing.assert_close(from_embeds, from_ids, rtol=1e-6, atol=1e-6)


# --- 2. gradient methods vs independent autograd ----------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_match_independent_autograd(arch: str, seed: int, loaded: dict[str, Loaded]) -> None:
    model, tokenizer = loaded[arch].model, loaded[arch].tokenizer
    inputs = problem(tokenizer)
    mask = random_mask(len(inputs.target_ids), seed)
    result = GradientEngine(model).saliency(inputs, mask.tolist(), [L2, DOT])

    ref = reference(model, inputs, mask)
    expected = expected_scores(ref, inputs, mask)
    assert set(result.scores) == {L2, DOT}
    for method in (L2, DOT):
        assert result.scores[method].shape == (inputs.total_tokens,)
        assert result.scores[method].dtype == np.float32
        assert_scores_close(result.scores[method], expected[method])
    assert (result.scores[L2] >= 0).all()
    np.testing.assert_allclose(result.target_token_logprobs, ref.target_token_logprobs, rtol=1e-5, atol=1e-5)
    assert result.target_logprob == pytest.approx(ref.value, rel=1e-5, abs=1e-5)
    assert result.target_logprob == pytest.approx(float(ref.target_token_logprobs[mask].sum()), abs=1e-4)
    assert result.foil_logprob is None
    assert result.ig_residual is None
    assert result.ig_steps == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_only_requested_methods_are_returned(arch: str, loaded: dict[str, Loaded]) -> None:
    inputs = problem(loaded[arch].tokenizer)
    mask = [True] * len(inputs.target_ids)
    engine = GradientEngine(loaded[arch].model)
    assert set(engine.saliency(inputs, mask, [DOT]).scores) == {DOT}
    ig_only = engine.saliency(inputs, mask, [IG], ig_steps=2)
    assert set(ig_only.scores) == {IG}
    assert ig_only.ig_steps == 2


# --- 3. finite differences in float64 ---------------------------------------------------------------


@dataclass(frozen=True)
class FiniteDifference:
    """Step and tolerances per architecture.

    GPT-2 is float64 through and through, so a plain central difference with a tiny step is exact
    to ~1e-9. The others keep float32 islands even after ``model.double()`` (RMSNorm upcasts to
    float32 and casts back, rotary cos/sin are float32), which puts ~1e-8 of rounding noise on L:
    a 5-point stencil with a larger step keeps both truncation and noise ~1e-5.
    """

    eps: float
    five_point: bool
    atol: float  # per coordinate, plus rtol * |gradient|
    rtol: float


STRICT_FD = FiniteDifference(eps=1e-5, five_point=False, atol=1e-8, rtol=1e-6)
NOISY_FD = FiniteDifference(eps=1e-2, five_point=True, atol=3e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradient_matches_finite_differences_in_float64(arch: str, loaded: dict[str, Loaded]) -> None:
    fd_setting = STRICT_FD if arch == "gpt2" else NOISY_FD
    model64 = load_causal_lm(loaded[arch].path, CPU, torch.float32).double()
    tokenizer = loaded[arch].tokenizer
    inputs = problem(tokenizer, target=" Paris, and Rome.")
    mask = np.ones(len(inputs.target_ids), dtype=bool)
    n_prompt = len(inputs.prompt_ids)
    engine = GradientEngine(model64)
    assert engine.dtype == torch.float64
    result = engine.saliency(inputs, mask.tolist(), [L2, DOT])

    ref = reference(model64, inputs, mask)
    assert ref.grad.dtype == torch.float64
    base = ref.embeds

    def loss(token: int, dim: int, step: float) -> float:
        moved = base.clone()
        moved[token, dim] += step
        with torch.no_grad():
            value, _ = objective(model64, inputs, mask, moved[:n_prompt], moved[n_prompt:])
        return float(value)

    def finite_difference(token: int, dim: int) -> float:
        h = fd_setting.eps
        if not fd_setting.five_point:
            return (loss(token, dim, h) - loss(token, dim, -h)) / (2 * h)
        return (
            -loss(token, dim, 2 * h)
            + 8 * loss(token, dim, h)
            - 8 * loss(token, dim, -h)
            + loss(token, dim, -2 * h)
        ) / (12 * h)

    # A few coordinates over prompt and target: the independent autograd gradient is right.
    rng = np.random.default_rng(7)
    last = n_prompt + len(inputs.target_ids) - 1  # the last token never influences L
    for token in (0, n_prompt - 1, n_prompt, last - 1):
        dim = int(rng.integers(base.shape[1]))
        expected = float(ref.grad[token, dim])
        assert finite_difference(token, dim) == pytest.approx(
            expected, abs=fd_setting.atol + fd_setting.rtol * abs(expected)
        ), (token, dim)
    assert finite_difference(last, 0) == pytest.approx(0.0, abs=fd_setting.atol)

    # Every dimension of one prompt token: the engine's L2 and dot scores are the FD gradient's.
    token = n_prompt - 2
    fd = torch.tensor([finite_difference(token, d) for d in range(base.shape[1])], dtype=torch.float64)
    torch.testing.assert_close(fd, ref.grad[token], rtol=fd_setting.rtol, atol=fd_setting.atol)
    fd_norm = float(fd.norm())
    assert fd_norm > 0.01
    norm_tol = 1e-4 * fd_norm + fd_setting.atol * base.shape[1] ** 0.5
    assert float(result.scores[L2][token]) == pytest.approx(fd_norm, abs=norm_tol)
    dot_tol = norm_tol * float(base[token].norm())
    assert float(result.scores[DOT][token]) == pytest.approx(float(fd @ base[token]), abs=dot_tol)
    assert result.target_logprob == pytest.approx(ref.value, rel=1e-6)


# --- 4. zeros at and after the last selected position -----------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scores_zero_from_the_last_selected_position(arch: str, loaded: dict[str, Loaded]) -> None:
    inputs = problem(loaded[arch].tokenizer)
    n_prompt, n_target = len(inputs.prompt_ids), len(inputs.target_ids)
    engine = GradientEngine(loaded[arch].model)
    for selected in ([1, 3], [0], [n_target - 1], [2, n_target - 2]):
        mask = np.zeros(n_target, dtype=bool)
        mask[selected] = True
        last = n_prompt + max(selected)
        result = engine.saliency(inputs, mask.tolist(), ALL_METHODS, ig_steps=2)
        for method in ALL_METHODS:
            values = result.scores[method]
            assert (values[last:] == 0.0).all(), (method, selected)
            assert (values[:last] != 0.0).all(), (method, selected)
        assert (result.scores[L2][:last] > 0).all()


# --- 5. integrated gradients ------------------------------------------------------------------------


def zero_baseline_objective(model: Any, inputs: SaliencyInputs, mask: np.ndarray) -> float:
    """L(baseline): every explained embedding set to 0 (the prompt only, with a foil)."""
    inputs, mask = framed(inputs, mask)
    n_prompt = len(inputs.prompt_ids)
    full = embed(model, list(inputs.prompt_ids) + list(inputs.target_ids))
    zeros = torch.zeros_like(full)
    with torch.no_grad():
        if inputs.foil_ids is None:
            value, _ = objective(model, inputs, mask, zeros[:n_prompt], zeros[n_prompt:])
        else:
            value, _ = objective(model, inputs, mask, zeros[:n_prompt], full[n_prompt:])
    return float(value)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("foil", [None, FOIL_SHORT])
def test_ig_residual_is_the_completeness_gap(arch: str, foil: str | None, loaded: dict[str, Loaded]) -> None:
    model = loaded[arch].model
    inputs = problem(loaded[arch].tokenizer, foil)
    mask = random_mask(len(inputs.target_ids), 3)
    for steps in (1, 4):
        result = GradientEngine(model).saliency(inputs, mask.tolist(), [IG], ig_steps=steps)
        assert result.ig_steps == steps
        assert result.ig_residual is not None
        l_x = reference(model, inputs, mask).value
        l_0 = zero_baseline_objective(model, inputs, mask)
        gap = abs(float(result.scores[IG].astype(np.float64).sum()) - (l_x - l_0))
        assert result.ig_residual == pytest.approx(gap, abs=1e-4 + 1e-5 * abs(l_x - l_0))


@pytest.mark.parametrize("foil", [None, FOIL_LONG])
def test_ig_converges_on_gpt2(foil: str | None, loaded: dict[str, Loaded]) -> None:
    """GPT-2 adds position embeddings after e, so the path from the zero baseline is smooth."""
    model = loaded["gpt2"].model
    inputs = problem(loaded["gpt2"].tokenizer, foil)
    mask = np.ones(len(inputs.target_ids), dtype=bool)
    engine = GradientEngine(model)
    residuals = {
        steps: engine.saliency(inputs, mask.tolist(), [IG], ig_steps=steps).ig_residual for steps in (8, 64)
    }
    delta = abs(reference(model, inputs, mask).value - zero_baseline_objective(model, inputs, mask))
    assert delta > 0.1
    assert residuals[8] is not None and residuals[64] is not None
    assert residuals[64] < residuals[8] / 4
    assert residuals[64] < 1e-2 * delta


def documented_schedule(steps: int, power: int) -> list[tuple[float, float]]:
    """``(alpha_k, weight_k)`` as the engine documents them: ``alpha = u**power`` with the midpoint
    rule in ``u`` (``u_k = (k + 0.5) / steps``), so ``weight_k = power * u_k**(power - 1) / steps``.
    ``power = 1`` is the plain midpoint Riemann sum."""
    points = []
    for k in range(steps):
        u = (k + 0.5) / steps
        points.append((u**power, power * u ** (power - 1) / steps))
    return points


def independent_ig(
    model: Any, inputs: SaliencyInputs, mask: np.ndarray, schedule: Sequence[tuple[float, float]]
) -> np.ndarray:
    """e . sum_k w_k dL/de(alpha_k e), zeroed from the last selected position (prompt only with a foil)."""
    inputs, mask = framed(inputs, mask)
    embeds = reference(model, inputs, mask).embeds
    total = sum(weight * reference(model, inputs, mask, scale=alpha).grad for alpha, weight in schedule)
    assert isinstance(total, torch.Tensor)
    expected = padded((total * embeds).sum(-1), inputs.total_tokens)
    limit = len(inputs.prompt_ids)
    if inputs.foil_ids is None:
        limit += int(np.flatnonzero(mask)[-1])
    expected[limit:] = 0.0
    return expected


@pytest.mark.parametrize("steps", [1, 3, 16])
def test_ig_schedule_is_the_documented_one(steps: int) -> None:
    for power in (1, 2, 3):
        alphas, weights = ig_schedule(steps, power)
        expected = documented_schedule(steps, power)
        assert alphas.tolist() == pytest.approx([a for a, _ in expected], rel=1e-6)
        assert weights.tolist() == pytest.approx([w for _, w in expected], rel=1e-6)
        assert all(0.0 < a < 1.0 for a in alphas.tolist())
        assert alphas.tolist() == sorted(alphas.tolist())
    alphas, weights = ig_schedule(64, 3)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-3)  # a quadrature of the integral over [0, 1]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("foil", [None, FOIL_SHORT])
def test_ig_one_step_plain_midpoint_is_gradient_at_half(
    arch: str, foil: str | None, loaded: dict[str, Loaded]
) -> None:
    """With the plain midpoint rule (power 1) and one step: IG = e . dL/de(0.5 e)."""
    model = loaded[arch].model
    inputs = problem(loaded[arch].tokenizer, foil)
    mask = random_mask(len(inputs.target_ids), 5)
    engine = GradientEngine(model)
    engine.ig_power = 1
    result = engine.saliency(inputs, mask.tolist(), [IG], ig_steps=1)
    assert_scores_close(result.scores[IG], independent_ig(model, inputs, mask, [(0.5, 1.0)]))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("foil", [None, FOIL_SHORT])
def test_ig_one_step_uses_the_engine_schedule(arch: str, foil: str | None, loaded: dict[str, Loaded]) -> None:
    model = loaded[arch].model
    inputs = problem(loaded[arch].tokenizer, foil)
    mask = random_mask(len(inputs.target_ids), 5)
    engine = GradientEngine(model)
    result = engine.saliency(inputs, mask.tolist(), [IG], ig_steps=1)
    schedule = documented_schedule(1, engine.ig_power)
    assert_scores_close(result.scores[IG], independent_ig(model, inputs, mask, schedule))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma"])
@pytest.mark.parametrize("power", [1, None])
def test_ig_matches_independent_quadrature(arch: str, power: int | None, loaded: dict[str, Loaded]) -> None:
    """IG = e . sum_k w_k dL/de(alpha_k e) for the documented schedule, whatever the IG batch size."""
    model = loaded[arch].model
    inputs = problem(loaded[arch].tokenizer)
    mask = random_mask(len(inputs.target_ids), 11)
    steps = 5
    for batch_size in (1, 2, 8):
        engine = GradientEngine(model, ig_batch_size=batch_size)
        if power is not None:
            engine.ig_power = power
        expected = independent_ig(model, inputs, mask, documented_schedule(steps, engine.ig_power))
        result = engine.saliency(inputs, mask.tolist(), [IG], ig_steps=steps)
        assert_scores_close(result.scores[IG], expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ig_does_not_depend_on_ig_batch_size(arch: str, loaded: dict[str, Loaded]) -> None:
    model = loaded[arch].model
    inputs = problem(loaded[arch].tokenizer, FOIL_LONG if arch == "qwen2" else None)
    mask = random_mask(len(inputs.target_ids), 13)
    results = [
        GradientEngine(model, ig_batch_size=b).saliency(inputs, mask.tolist(), [IG], ig_steps=6)
        for b in (1, 4, 16)
    ]
    for other in results[1:]:
        assert_scores_close(other.scores[IG], results[0].scores[IG])
        assert other.ig_residual == pytest.approx(results[0].ig_residual, abs=1e-5)


# --- 6. contrastive (foil) --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("foil", [FOIL_SHORT, FOIL_LONG])
def test_contrastive_matches_independent_autograd(arch: str, foil: str, loaded: dict[str, Loaded]) -> None:
    model, tokenizer = loaded[arch].model, loaded[arch].tokenizer
    inputs = problem(tokenizer, foil)
    assert inputs.foil_ids is not None
    n_prompt = len(inputs.prompt_ids)
    mask = random_mask(len(inputs.target_ids), 17)
    mask[0] = True  # the selection starts the target: the foil is the alternative to all of it
    result = GradientEngine(model).saliency(inputs, mask.tolist(), [L2, DOT])

    ref = reference(model, inputs, mask)  # dL/de_prompt of sum log p(target) - sum log p(foil)
    expected = expected_scores(ref, inputs, mask)
    for method in (L2, DOT):
        assert result.scores[method].shape == (inputs.total_tokens,)
        assert (result.scores[method][n_prompt:] == 0.0).all()
        assert (result.scores[method][:n_prompt] != 0.0).all()
        assert_scores_close(result.scores[method], expected[method])

    # Padding the shorter row changes nothing: log-probs as in unpadded single-row forwards.
    np.testing.assert_allclose(result.target_token_logprobs, ref.target_token_logprobs, rtol=1e-5, atol=1e-5)
    assert result.target_logprob == pytest.approx(float(ref.target_token_logprobs[mask].sum()), abs=1e-4)
    foil_ids = list(inputs.foil_ids)
    prompt_ids = list(inputs.prompt_ids)
    with torch.no_grad():
        foil_lp = tail_logprobs(model, embed(model, prompt_ids + foil_ids), prompt_ids + foil_ids, n_prompt)
    assert result.foil_logprob == pytest.approx(float(foil_lp.sum()), rel=1e-5, abs=1e-4)
    assert ref.value == pytest.approx(result.target_logprob - result.foil_logprob, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_contrastive_selection_is_contrasted_with_the_foil_in_its_place(
    arch: str, loaded: dict[str, Loaded]
) -> None:
    """A selection from target token a on: L = log p(selection | prompt, target_<a) - log p(foil |
    prompt, target_<a); the prompt and the target before a get the scores."""
    model, tokenizer = loaded[arch].model, loaded[arch].tokenizer
    inputs = problem(tokenizer, FOIL_SHORT)
    assert inputs.foil_ids is not None
    n_prompt, n_target = len(inputs.prompt_ids), len(inputs.target_ids)
    a = n_target // 2
    later = np.zeros(n_target, dtype=bool)
    later[a:] = True
    first = np.zeros(n_target, dtype=bool)
    first[0] = True
    engine = GradientEngine(model)
    results = list(engine.saliency_batch(inputs, np.stack([later, first]), [L2, DOT]))
    assert [r.selection for r in results] == [0, 1]
    result = results[0]
    # independently: the frame's objective by plain autograd
    context = [*inputs.prompt_ids, *inputs.target_ids[:a]]
    ref = reference(model, inputs, later)
    expected = expected_scores(ref, inputs, later)
    for method in (L2, DOT):
        assert_scores_close(result.scores[method], expected[method])
        assert (result.scores[method][n_prompt + a :] == 0.0).all()
        assert (result.scores[method][n_prompt : n_prompt + a] != 0.0).any()  # the shared context
    foil_ids = list(inputs.foil_ids)
    with torch.no_grad():
        foil_lp = tail_logprobs(model, embed(model, context + foil_ids), context + foil_ids, len(context))
        whole_lp = tail_logprobs(model, embed(model, [*inputs.prompt_ids, *inputs.target_ids]),
                                 [*inputs.prompt_ids, *inputs.target_ids], n_prompt)  # fmt: skip
    assert result.foil_logprob == pytest.approx(float(foil_lp.sum()), rel=1e-5, abs=1e-4)
    np.testing.assert_allclose(result.target_token_logprobs, whole_lp.numpy(), rtol=1e-5, atol=1e-5)
    assert result.target_logprob == pytest.approx(float(whole_lp[a:].sum()), abs=1e-4)
    assert ref.value == pytest.approx(result.target_logprob - result.foil_logprob, rel=1e-5, abs=1e-4)
    # the selection of the first token is contrasted with the foil after the prompt alone
    single = engine.saliency(inputs, first.tolist(), [L2, DOT])
    assert_same_result(results[1], single)
    assert (results[1].scores[L2][n_prompt:] == 0.0).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_contrastive_is_target_minus_foil(arch: str, loaded: dict[str, Loaded]) -> None:
    """Linearity: dot(target vs foil) = dot(target) - dot(foil as the target), on the prompt."""
    tokenizer = loaded[arch].tokenizer
    engine = GradientEngine(loaded[arch].model)
    contrastive_inputs = problem(tokenizer, FOIL_SHORT)
    target_inputs = problem(tokenizer)
    foil_inputs = problem(tokenizer, target=FOIL_SHORT)
    n_prompt = len(contrastive_inputs.prompt_ids)

    def prompt_dot(inputs: SaliencyInputs) -> np.ndarray:
        result = engine.saliency(inputs, [True] * len(inputs.target_ids), [DOT])
        return result.scores[DOT][:n_prompt].astype(np.float64)

    contrastive = prompt_dot(contrastive_inputs)
    expected = prompt_dot(target_inputs) - prompt_dot(foil_inputs)
    assert_scores_close(contrastive, expected)
    # The sign convention: the foil's own gradient enters negatively.
    assert not np.allclose(contrastive, prompt_dot(target_inputs), rtol=1e-3, atol=1e-3)


# --- 7. batched selections ----------------------------------------------------------------------------


def assert_same_result(actual: SaliencyResult, expected: SaliencyResult) -> None:
    assert set(actual.scores) == set(expected.scores)
    for method, values in expected.scores.items():
        np.testing.assert_allclose(actual.scores[method], values, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(actual.target_token_logprobs, expected.target_token_logprobs, atol=1e-5)
    assert actual.target_logprob == pytest.approx(expected.target_logprob, abs=1e-5)
    if expected.foil_logprob is None:
        assert actual.foil_logprob is None
    else:
        assert actual.foil_logprob == pytest.approx(expected.foil_logprob, abs=1e-5)
    if expected.ig_residual is None:
        assert actual.ig_residual is None
    else:
        assert actual.ig_residual == pytest.approx(expected.ig_residual, abs=1e-5)
    assert actual.ig_steps == expected.ig_steps


def in_order(results: Iterable[SaliencyResult]) -> list[SaliencyResult]:
    """Results by selection index (with a foil, selections sharing a first token come together)."""
    return sorted(results, key=lambda r: r.selection)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("foil", [None, FOIL_SHORT])
def test_batch_equals_separate_calls(arch: str, foil: str | None, loaded: dict[str, Loaded]) -> None:
    model = loaded[arch].model
    inputs = problem(loaded[arch].tokenizer, foil)
    n_target = len(inputs.target_ids)
    masks = np.stack([random_mask(n_target, 100 + k) for k in range(4)])
    masks[0] = False
    masks[0][0] = True  # a selection whose last position is the first target token
    singles = [GradientEngine(model).saliency(inputs, m.tolist(), ALL_METHODS, ig_steps=3) for m in masks]

    engine = GradientEngine(model)
    stream = engine.saliency_batch(inputs, masks, ALL_METHODS, ig_steps=3)
    assert inspect.isgenerator(stream)
    batched = in_order(stream)
    assert len(batched) == len(masks)
    for got, want in zip(batched, singles, strict=True):
        assert_same_result(got, want)

    chunked = GradientEngine(model, segment_batch_size=3)  # chunks of 3 + 1 selections
    for got, want in zip(
        in_order(chunked.saliency_batch(inputs, masks, ALL_METHODS, ig_steps=3)), singles, strict=True
    ):
        assert_same_result(got, want)

    fallback = GradientEngine(model)
    fallback._batched_vjp_ok = False  # one backward per selection
    for got, want in zip(
        in_order(fallback.saliency_batch(inputs, masks, ALL_METHODS, ig_steps=3)), singles, strict=True
    ):
        assert_same_result(got, want)


def test_batch_rejects_bad_masks(loaded: dict[str, Loaded]) -> None:
    inputs = problem(loaded["llama"].tokenizer)
    n_target = len(inputs.target_ids)
    engine = GradientEngine(loaded["llama"].model)
    for masks in (
        np.ones((2, n_target + 1), dtype=bool),
        np.ones(n_target, dtype=bool),
        np.array([[True] * n_target, [False] * n_target]),
    ):
        with pytest.raises(ValueError):
            next(engine.saliency_batch(inputs, masks, [L2]))


# --- 8. cancellation --------------------------------------------------------------------------------


def cancel_after(calls: int) -> Callable[[], bool]:
    """A cancel check that says "cancelled" from its ``calls + 1``-th call on."""
    seen = [0]

    def cancelled() -> bool:
        seen[0] += 1
        return seen[0] > calls

    return cancelled


@pytest.mark.parametrize("calls", [0, 1, 2, 3])
def test_cancelled_raises(calls: int, loaded: dict[str, Loaded]) -> None:
    inputs = problem(loaded["llama"].tokenizer)
    mask = [True] * len(inputs.target_ids)
    engine = GradientEngine(loaded["llama"].model, ig_batch_size=2)
    with pytest.raises(CancelledError):
        engine.saliency(inputs, mask, ALL_METHODS, ig_steps=8, cancelled=cancel_after(calls))
    with pytest.raises(CancelledError):
        list(engine.saliency_batch(inputs, np.ones((3, len(mask)), dtype=bool), [L2], cancelled=lambda: True))
    # The engine is usable afterwards (its lock was released).
    result = engine.saliency(inputs, mask, [L2], cancelled=lambda: False)
    assert (result.scores[L2][: len(inputs.prompt_ids)] > 0).all()


# --- 9. cross-request batching ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padded_batch_of_problems_equals_separate_calls(arch: str, loaded: dict[str, Loaded]) -> None:
    """Several problems of different lengths (so rows are padded) in one batch, for every architecture."""
    tokenizer = loaded[arch].tokenizer
    engine = GradientEngine(loaded[arch].model)
    items = [
        (problem(tokenizer), random_mask(len(problem(tokenizer).target_ids), 1)),
        (
            problem(tokenizer, target=" Rome."),
            np.ones(len(problem(tokenizer, target=" Rome.").target_ids), bool),
        ),
        (
            problem(tokenizer, target=FOIL_LONG),
            random_mask(len(problem(tokenizer, target=FOIL_LONG).target_ids), 2),
        ),
    ]
    assert len({i.total_tokens for i, _ in items}) == 3  # three widths: two rows are padded
    batched = list(engine.saliency_many([(i, m.tolist()) for i, m in items], [L2, DOT]))
    assert [r.selection for r in batched] == [0, 1, 2]
    for (inputs, mask), got in zip(items, batched, strict=True):
        want = engine.saliency(inputs, mask.tolist(), [L2, DOT])
        assert_same_result(got, want)
    with pytest.raises(ValueError):
        list(
            engine.saliency_many(
                [(problem(tokenizer, FOIL_SHORT), [True] * n) for n in [len(items[0][0].target_ids)]], [L2]
            )
        )
    with pytest.raises(ValueError):
        list(engine.saliency_many([(items[0][0], items[0][1].tolist())], [IG]))
