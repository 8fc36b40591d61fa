"""One method's scores for one selection, between the engine and the wire: one type, two codecs.

The engine yields a :class:`~saliency_server.engine.SaliencyResult` per selection (every
method's scores at once); :func:`from_result` turns it into one :class:`MethodEntry` per method,
the perturbation methods build theirs directly, and from there on an entry is what serving
caches, joins and answers with:

* :func:`to_cache` / :func:`from_cache`: the cache's ``(meta, arrays)`` (what
  :func:`saliency_server.cache.put_entry` checksums and stores). The layout is the one servers
  have always written, so entries stored before are read as they were, and an entry that does
  not hold what an entry needs, or not for this problem's sizes, is a miss (never a wrong answer).
* :func:`to_wire`: the ``MethodScores`` of a response.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from saliency_server.engine import SaliencyResult
from saliency_server.perturbation import PERTURBATION_METHODS
from seqsal.v1 import common_pb2, saliency_pb2

__all__ = ["MethodEntry", "from_cache", "from_result", "to_cache", "to_wire"]


@dataclass
class MethodEntry:
    """One method's cached or computed scores for one selection."""

    #: one score per token of the problem (prompt, target, foil)
    scores: np.ndarray
    #: log p of every target token (selected or not)
    target_token_logprobs: np.ndarray
    #: sum of log p over the selected target tokens
    target_logprob: float
    foil_logprob: float | None
    #: INTEGRATED_GRADIENTS: the completeness residual and the interpolation points
    ig_residual: float | None
    ig_steps: int
    #: the perturbation methods: LIME's R^2, perturbed prompts scored, and where
    r2: float | None = None
    perturbations: int = 0
    scored_by: str = ""


def from_result(result: SaliencyResult) -> dict[int, MethodEntry]:
    """The entries of one engine result, by method."""
    ig = common_pb2.INTEGRATED_GRADIENTS
    return {
        method: MethodEntry(
            scores=scores,
            target_token_logprobs=result.target_token_logprobs,
            target_logprob=result.target_logprob,
            foil_logprob=result.foil_logprob,
            ig_residual=result.ig_residual if method == ig else None,
            ig_steps=result.ig_steps if method == ig else 0,
        )
        for method, scores in result.scores.items()
    }


def to_cache(method: int, entry: MethodEntry) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The ``(meta, arrays)`` stored for an entry."""
    meta: dict[str, Any] = {
        "target_logprob": entry.target_logprob,
        "foil_logprob": entry.foil_logprob,
        "ig_residual": entry.ig_residual,
        "ig_steps": entry.ig_steps,
    }
    if method in PERTURBATION_METHODS:
        meta |= {"r2": entry.r2, "perturbations": entry.perturbations, "scored_by": entry.scored_by}
    return meta, {"scores": entry.scores, "target_token_logprobs": entry.target_token_logprobs}


def _number(value: object, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def from_cache(
    meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *, n_tokens: int, n_target: int
) -> MethodEntry | None:
    """The entry stored as ``(meta, arrays)`` for a problem of ``n_tokens`` tokens, ``n_target``
    of them target tokens; None (a miss) when it is not a whole entry of those sizes."""
    try:
        scores = np.asarray(arrays["scores"])
        logprobs = np.asarray(arrays["target_token_logprobs"])
        if scores.shape != (n_tokens,) or logprobs.shape != (n_target,):
            return None
        if scores.dtype.kind != "f" or logprobs.dtype.kind != "f":
            return None
        target_logprob = _number(meta["target_logprob"])
        assert target_logprob is not None
        ig_steps, perturbations = meta.get("ig_steps", 0), meta.get("perturbations", 0)
        if not isinstance(ig_steps, int) or not isinstance(perturbations, int):
            return None
        return MethodEntry(
            scores=scores,
            target_token_logprobs=logprobs,
            target_logprob=target_logprob,
            foil_logprob=_number(meta.get("foil_logprob"), optional=True),
            ig_residual=_number(meta.get("ig_residual"), optional=True),
            ig_steps=ig_steps,
            r2=_number(meta.get("r2"), optional=True),
            perturbations=perturbations,
            scored_by=str(meta.get("scored_by", "")),
        )
    except (KeyError, TypeError, ValueError):
        return None


def to_wire(method: int, entry: MethodEntry) -> saliency_pb2.MethodScores:
    """The ``MethodScores`` of a response for one method's entry."""
    out = saliency_pb2.MethodScores(method=method, scores=entry.scores.tolist())  # type: ignore[arg-type]
    if method == common_pb2.INTEGRATED_GRADIENTS:
        out.ig_steps = entry.ig_steps
        if entry.ig_residual is not None:
            out.completeness_residual = entry.ig_residual
    if method in PERTURBATION_METHODS:
        out.perturbations = entry.perturbations
        out.scored_by = entry.scored_by
        if entry.r2 is not None:
            out.r2 = entry.r2
    return out
