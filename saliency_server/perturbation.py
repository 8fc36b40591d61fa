"""Perturbation saliency and the ablation test, on token ids, independent of where variants are scored.

Features are the prompt segments at the request's granularity (tokens when it names none),
without their special tokens: BOS and the like are never removed, and a segment of special
tokens only is no feature. A variant of the prompt removes the token ids of some features (or,
for OCCLUSION with a filler, puts the filler's ids in place of each), so nothing is ever
re-tokenised and the rest of the prompt keeps its exact ids.

The objective of a variant is what the gradient methods explain: the sum of the selected
target tokens' log-probabilities, minus the foil's with a foil.

* OCCLUSION: effect of feature f = objective(prompt) - objective(prompt without f).
* LIME: ``samples`` random masks (seeded; as LIME's text explainer: remove a uniformly drawn
  number 1..n of features, chosen uniformly), the full prompt as the first sample, LIME's
  kernel on the cosine distance to the full prompt (width 0.25), and a weighted ridge
  regression (scikit-learn) of the objective on the features' presence: the coefficients are
  the effects, the weighted R^2 on the samples is reported.

A variant with no token left (every feature removed from a prompt without BOS) is scored after
the tokenizer's BOS token alone, else its EOS token: a causal model needs one token of context.

Per-token scores: a feature's effect is spread evenly over its tokens, so every segment's sum
is its effect; special tokens and target tokens score 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from seqsal import segmentation
from seqsal.errors import InvalidArgumentError
from seqsal.v1 import common_pb2, saliency_pb2

PERTURBATION_METHODS = (common_pb2.OCCLUSION, common_pb2.LIME)
DEFAULT_LIME_SAMPLES = 64
DEFAULT_RIDGE_ALPHA = 1.0
#: LIME's kernel width on the cosine distance (LIME's text explainer: 25 on distance x 100).
LIME_KERNEL_WIDTH = 0.25
#: Verify: removal sizes and random draws when the request names none.
DEFAULT_KS = (1, 2, 3, 5)
DEFAULT_DRAWS = 8
MAX_DRAWS = 64
MAX_KS = 16


@dataclass(frozen=True)
class PerturbationSpec:
    """Validated perturbation options (every one is part of the cache key of the method it affects)."""

    filler_ids: tuple[int, ...] = ()
    samples: int = DEFAULT_LIME_SAMPLES
    seed: int = 0
    ridge_alpha: float = DEFAULT_RIDGE_ALPHA

    def key_fields(self, method: int) -> dict[str, object]:
        if method == common_pb2.OCCLUSION:
            return {"filler_ids": list(self.filler_ids)}
        return {"samples": self.samples, "seed": self.seed, "ridge_alpha": repr(self.ridge_alpha)}


def validate_options(
    options: saliency_pb2.PerturbationOptions, filler_ids: Sequence[int], max_perturbations: int
) -> PerturbationSpec:
    """The spec of ``options`` (``filler_ids``: the filler, tokenised by the caller)."""
    samples = options.samples or DEFAULT_LIME_SAMPLES
    if not 1 <= samples <= max_perturbations:
        raise InvalidArgumentError(
            f"perturbation.samples = {options.samples} is out of range; use 1..{max_perturbations} "
            "(SEQSAL_MAX_PERTURBATIONS), or 0 for the default of 64",
            field="perturbation.samples",
        )
    alpha = float(options.ridge_alpha) or DEFAULT_RIDGE_ALPHA
    if not math.isfinite(alpha) or alpha < 0:
        raise InvalidArgumentError(
            f"perturbation.ridge_alpha = {options.ridge_alpha} must be a finite number >= 0 (0 = 1.0)",
            field="perturbation.ridge_alpha",
        )
    return PerturbationSpec(
        filler_ids=tuple(filler_ids), samples=samples, seed=int(options.seed), ridge_alpha=alpha
    )


@dataclass(frozen=True)
class Scorer:
    """What computes the variants' log-probs; what changes the numbers is part of the cache key.

    ``kind``: ``"inference"`` (an inference server's ``Score``) or ``"local"`` (this process),
    with the model revision, dtype and device it scores in: results scored in bfloat16 by an
    inference server and in float32 here never share an entry. The address is not in the key (two
    servers with the same model, revision, dtype and device give the same numbers), nor the
    backend (``ModelInfo`` does not name it; vLLM and transformers agree to ~1e-6 nats in float32).
    """

    kind: str
    revision: str
    dtype: str
    device: str
    #: where, in words (``MethodScores.scored_by``)
    described: str = field(default="", compare=False)

    def key_fields(self) -> dict[str, str]:
        return {
            "scorer": self.kind,
            "scorer_revision": self.revision,
            "scorer_dtype": self.dtype,
            "scorer_device": self.device,
        }


@dataclass(frozen=True)
class Feature:
    """One removable prompt segment: its index among the segments and its non-special token indices."""

    segment: int
    tokens: tuple[int, ...]


def perturbation_segments(
    tokens: Sequence[common_pb2.Token], segments: Sequence[common_pb2.Segment], granularity: int
) -> Sequence[common_pb2.Segment]:
    """The segments perturbed: the request's, or one per token when it names no granularity."""
    if granularity == common_pb2.GRANULARITY_UNSPECIFIED:
        return segmentation.segment_tokens(tokens, common_pb2.TOKENS, "")
    return segments


def prompt_features(
    tokens: Sequence[common_pb2.Token], segments: Sequence[common_pb2.Segment]
) -> list[Feature]:
    """The removable prompt segments, in order."""
    features = []
    for index, segment in enumerate(segments):
        if segment.part != common_pb2.PROMPT:
            continue
        own = tuple(j for j in range(segment.token_start, segment.token_end) if not tokens[j].special)
        if own:
            features.append(Feature(index, own))
    return features


def check_count(count: int, limit: int, *, what: str, field: str) -> None:
    if count > limit:
        raise InvalidArgumentError(
            f"{what} would score {count} perturbed prompts; this server scores at most {limit} per request "
            f"(SEQSAL_MAX_PERTURBATIONS); use a coarser granularity (sentences, lines) or fewer samples",
            field=field,
        )


def ablate(
    prompt_ids: Sequence[int], features: Sequence[Feature], removed: Iterable[int], filler: Sequence[int] = ()
) -> list[int]:
    """``prompt_ids`` without the tokens of the features ``removed`` (indices into ``features``);
    each removed feature's place takes ``filler`` (empty = deleted)."""
    drop: dict[int, bool] = {}
    for f in removed:
        positions = features[f].tokens
        drop[positions[0]] = True  # the filler goes here
        for position in positions[1:]:
            drop[position] = False
    out: list[int] = []
    for position, token_id in enumerate(prompt_ids):
        if position not in drop:
            out.append(token_id)
        elif drop[position]:
            out.extend(filler)
    return out


def ablated_text(
    tokens: Sequence[common_pb2.Token], features: Sequence[Feature], removed: Iterable[int]
) -> str:
    """The prompt text without the removed features (special tokens are not part of the text)."""
    gone = {position for f in removed for position in features[f].tokens}
    return "".join(
        t.text
        for j, t in enumerate(tokens)
        if t.part == common_pb2.PROMPT and not t.special and j not in gone
    )


def token_scores(n_tokens: int, features: Sequence[Feature], effects: Sequence[float]) -> np.ndarray:
    """Per-token scores: each feature's effect spread evenly over its tokens (segment sums = effects)."""
    scores = np.zeros(n_tokens, dtype=np.float32)
    for feature, effect in zip(features, effects, strict=True):
        scores[list(feature.tokens)] = effect / len(feature.tokens)
    return scores


def feature_scores(features: Sequence[Feature], scores: Sequence[float]) -> np.ndarray:
    """Each feature's summed token scores (its segment's score without special tokens)."""
    values = np.asarray(scores, dtype=np.float64)
    return np.array([values[list(f.tokens)].sum() for f in features])


# --- LIME --------------------------------------------------------------------------------------------


def lime_masks(n_features: int, samples: int, seed: int) -> np.ndarray:
    """``(samples, n_features)`` presence masks (True = kept), as LIME's text explainer draws them."""
    rng = np.random.default_rng(seed)
    masks = np.ones((samples, n_features), dtype=bool)
    for row in masks:
        removed = rng.choice(n_features, size=int(rng.integers(1, n_features + 1)), replace=False)
        row[removed] = False
    return masks


def lime_weights(masks: np.ndarray) -> np.ndarray:
    """LIME's kernel on the cosine distance between each mask and the full prompt."""
    n = masks.shape[1]
    distance = 1.0 - np.sqrt(masks.sum(axis=1) / n)
    return np.sqrt(np.exp(-(distance**2) / LIME_KERNEL_WIDTH**2))


@dataclass
class LimeFit:
    effects: np.ndarray
    intercept: float
    r2: float


def lime_fit(masks: np.ndarray, objective: np.ndarray, alpha: float) -> LimeFit:
    """Weighted ridge regression of ``objective`` on the presence ``masks`` (rows: samples)."""
    from sklearn.linear_model import Ridge

    x = masks.astype(np.float64)
    y = np.asarray(objective, dtype=np.float64)
    weights = lime_weights(masks)
    model = Ridge(alpha=alpha)
    model.fit(x, y, sample_weight=weights)
    residual = y - model.predict(x)
    mean = np.average(y, weights=weights)
    total = float(np.sum(weights * (y - mean) ** 2))
    r2 = 1.0 - float(np.sum(weights * residual**2)) / total if total > 0 else 1.0
    return LimeFit(
        effects=np.asarray(model.coef_, dtype=np.float64), intercept=float(model.intercept_), r2=r2
    )


# --- the variants of one request ---------------------------------------------------------------------


@dataclass
class Plan:
    """Perturbed prompts to score, row 0 the full prompt; each method's rows among them."""

    prompt_ids: list[int]
    features: list[Feature]
    #: what a variant with no token left is scored after (the tokenizer's BOS, else EOS)
    empty: list[int]
    rows: list[list[int]] = field(default_factory=list)
    occlusion: list[int] = field(default_factory=list)  # row of each feature removed
    lime: list[int] = field(default_factory=list)  # row of each LIME sample
    lime_masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.rows = [list(self.prompt_ids)]

    def add(self, removed: Iterable[int], filler: Sequence[int] = ()) -> int:
        self.rows.append(ablate(self.prompt_ids, self.features, removed, filler) or list(self.empty))
        return len(self.rows) - 1


def plan_methods(
    prompt_ids: Sequence[int],
    features: list[Feature],
    methods: Sequence[int],
    spec: PerturbationSpec,
    empty: Sequence[int],
) -> Plan:
    plan = Plan(list(prompt_ids), features, list(empty))
    if common_pb2.OCCLUSION in methods:
        plan.occlusion = [plan.add([f], spec.filler_ids) for f in range(len(features))]
    if common_pb2.LIME in methods:
        plan.lime_masks = lime_masks(len(features), spec.samples, spec.seed)
        plan.lime = [plan.add(np.flatnonzero(~mask).tolist()) for mask in plan.lime_masks]
    return plan


def method_effects(
    plan: Plan, method: int, objective: np.ndarray, spec: PerturbationSpec
) -> tuple[np.ndarray, float | None]:
    """Per-feature effects of ``method`` from the objective of every row (and LIME's R^2)."""
    if method == common_pb2.OCCLUSION:
        return objective[0] - objective[plan.occlusion], None
    assert plan.lime_masks is not None
    masks = np.vstack([np.ones((1, len(plan.features)), dtype=bool), plan.lime_masks])
    fit = lime_fit(masks, objective[[0, *plan.lime]], spec.ridge_alpha)
    return fit.effects, fit.r2


def objectives(
    target_lp: Sequence[np.ndarray], foil_lp: Sequence[np.ndarray] | None, mask: np.ndarray
) -> np.ndarray:
    """The objective of every scored row for one selection."""
    values = np.array([float(lp[mask].astype(np.float64).sum()) for lp in target_lp])
    if foil_lp is not None:
        values -= np.array([float(lp.astype(np.float64).sum()) for lp in foil_lp])
    return values


# --- Verify ------------------------------------------------------------------------------------------


@dataclass
class VerifyPlan:
    """The variants of an ablation test, row 0 the full prompt."""

    plan: Plan
    ranking: list[int]  # features by score, highest first
    ks: list[int]
    top: dict[int, int] = field(default_factory=dict)  # k -> row with the top-k removed
    random: dict[int, list[int]] = field(default_factory=dict)  # k -> rows with k random removed
    only: dict[int, int] = field(default_factory=dict)  # k -> row with only the top-k kept
    draws: dict[int, list[list[int]]] = field(default_factory=dict)  # k -> features removed per draw


def validate_verify(ks: Sequence[int], draws: int) -> tuple[list[int], int]:
    """The sorted distinct ks (default 1, 2, 3, 5) and the number of random draws (default 8)."""
    if len(ks) > MAX_KS:
        raise InvalidArgumentError(f"k has {len(ks)} entries; send at most {MAX_KS}", field="k")
    for i, k in enumerate(ks):
        if k < 1:
            raise InvalidArgumentError(f"k[{i}] = {k}; each k must be at least 1", field="k")
    if not 0 <= draws <= MAX_DRAWS:
        raise InvalidArgumentError(
            f"random_draws = {draws} is out of range; use 1..{MAX_DRAWS}, or 0 for the default of "
            f"{DEFAULT_DRAWS}",
            field="random_draws",
        )
    return sorted(set(ks)) or list(DEFAULT_KS), draws or DEFAULT_DRAWS


def plan_verify(
    prompt_ids: Sequence[int],
    features: list[Feature],
    scores: np.ndarray,
    ks: Sequence[int],
    draws: int,
    seed: int,
    empty: Sequence[int],
) -> VerifyPlan:
    """Top-k removed, k random removed (``draws`` seeded draws) and top-k kept, for every k that fits."""
    ranking = sorted(range(len(features)), key=lambda f: (-scores[f], f))
    used = [k for k in ks if k <= len(features)]
    verify = VerifyPlan(Plan(list(prompt_ids), features, list(empty)), ranking, used)
    rng = np.random.default_rng(seed)
    everything = set(range(len(features)))
    for k in used:
        top = ranking[:k]
        verify.top[k] = verify.plan.add(top)
        verify.draws[k] = [
            sorted(rng.choice(len(features), size=k, replace=False).tolist()) for _ in range(draws)
        ]
        verify.random[k] = [verify.plan.add(d) for d in verify.draws[k]]
        verify.only[k] = verify.plan.add(sorted(everything - set(top)))
    return verify


def verify_count(n_features: int, ks: Sequence[int], draws: int) -> int:
    """Prompts a Verify call scores (the full one included)."""
    return 1 + sum(2 + draws for k in ks if k <= n_features)
