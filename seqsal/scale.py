"""The colour-scale rules of a heatmap: which tokens set the range, how segments aggregate.

One module for the rules, used by every renderer (:mod:`seqsal.render` for the HTML export and
the CLI's terminal view, ``ui.heatmap`` for the workbench), so the three draw the same colours
for the same response and the same :class:`ScaleRules`.

Two kinds of token are left **out of the range** by default, because their gradients say little
about the prompt's content and would spend the whole colour scale on themselves:

* the **attention-sink position**: the first token of the sequence (a BOS when the model adds
  one, otherwise the prompt's first token). Causal LMs park attention there, and its gradient is
  routinely the largest of the prompt (4.77 against 3.53 for the next on the restaurant example);
* **special tokens** (BOS, EOS, and the chat-template markers such as ``<|im_start|>`` that
  :func:`seqsal.segmentation.special_flags` flags, though the tokenizer does not).

``include_template=False`` also leaves out the rest of a chat template: every prompt token
outside the user's own text ``user_text`` (the template's roles and its built-in system prompt,
which otherwise can be the darkest part of a templated prompt); see
:func:`seqsal.segmentation.template_tokens`.

Such a token is drawn as its own unit with a marker and its value on hover, never with a
saturated colour, and, at segment granularity, its score is not added into its segment's score.
``include_sink`` / ``include_special`` bring them back (the scores are then exactly the server's).

``clip_percentile`` (e.g. 99) sets the range to that percentile of the ``|score|`` of the
reference units instead of their maximum (numpy's linear interpolation), so one outlier cannot
wash out the rest; units beyond it are clipped to the end colour. ``aggregate="mean"`` divides a
segment's score by its number of (counted) tokens, so that long segments do not look important
only because they are long (the paper's section 3 notes the effect of summing, its choice and
our default).

``fixed_scale`` ends the range at a given ``|score|`` instead (used for a colour range shared by
the two sides of a side-by-side comparison: :func:`shared_scale` of each side's own range), so
two heatmaps drawn with it are comparable colour for colour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "AGGREGATES",
    "ScaleRules",
    "aggregate",
    "excluded_tokens",
    "reference_scale",
    "shared_scale",
]

Aggregate = Literal["sum", "mean"]
AGGREGATES: tuple[Aggregate, ...] = ("sum", "mean")

#: Index of the attention-sink position in a response's tokens (the first token of the sequence).
SINK_INDEX = 0


@dataclass(frozen=True, slots=True)
class ScaleRules:
    """How a heatmap's colour range is chosen and how segment scores are aggregated."""

    #: Count the first token of the sequence (the attention sink) in the range and in its segment.
    include_sink: bool = False
    #: Count special tokens (BOS, EOS, chat-template markers) in the range and in their segments.
    include_special: bool = False
    #: The range is this percentile (0 < p <= 100) of the reference ``|scores|``; None = the maximum.
    clip_percentile: float | None = None
    #: A segment's score: the sum of its counted tokens' scores (the paper's choice) or their mean.
    aggregate: Aggregate = "sum"
    #: The range ends at this ``|score|`` (a range shared with another heatmap); None = its own.
    fixed_scale: float | None = None
    #: Count a chat template's tokens around ``user_text`` (roles, built-in system prompt).
    include_template: bool = True
    #: The user's own text inside a templated prompt (what ``include_template=False`` keeps).
    user_text: str = ""

    def __post_init__(self) -> None:
        p = self.clip_percentile
        if p is not None and not (math.isfinite(p) and 0.0 < p <= 100.0):
            raise ValueError(f"clip_percentile must be in (0, 100], got {p!r}")
        f = self.fixed_scale
        if f is not None and not (math.isfinite(f) and f > 0.0):
            raise ValueError(f"fixed_scale must be a finite number > 0, got {f!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")

    @property
    def is_default(self) -> bool:
        return self == ScaleRules()

    def describe(self) -> str:
        """One sentence for a legend: what is left out of the range and how it is set."""
        left_out = []
        if not self.include_sink:
            left_out.append("the first token (attention sink)")
        if not self.include_special:
            left_out.append("special tokens")
        if not self.include_template:
            left_out.append("the chat template around your prompt")
        parts = []
        if left_out:
            parts.append(f"{' and '.join(left_out)} are left out of the range (marked ⊘, value on hover)")
        if self.clip_percentile is not None:
            parts.append(f"the range is the {self.clip_percentile:g}th percentile of |score|")
        if self.aggregate == "mean":
            parts.append("segment scores are means over their tokens")
        if self.fixed_scale is not None:
            parts.append("the range is shared by both sides (the larger of their ranges)")
        if not parts:
            return ""
        text = "; ".join(parts) + "."
        return text[0].upper() + text[1:]


def excluded_tokens(
    special: Sequence[bool], rules: ScaleRules, template: Sequence[bool] | None = None
) -> list[bool]:
    """Per token: True when ``rules`` leave it out of the range (and out of its segment's score).

    ``template`` flags the chat template's tokens (used when ``rules.include_template`` is off).
    """
    out = [bool(s) and not rules.include_special for s in special]
    if template is not None and not rules.include_template:
        out = [o or bool(t) for o, t in zip(out, template, strict=True)]
    if out and not rules.include_sink:
        out[SINK_INDEX] = True
    return out


def aggregate(scores: Sequence[float], rules: ScaleRules) -> float:
    """A segment's score from its counted tokens' scores (0.0 for none)."""
    if not scores:
        return 0.0
    total = math.fsum(float(s) for s in scores)
    return total / len(scores) if rules.aggregate == "mean" else total


def reference_scale(scores: Sequence[float], rules: ScaleRules) -> float:
    """The ``|score|`` at which the colour range ends, over the reference units' ``scores``.

    Non-finite scores are ignored; 0.0 when there is none or all are 0.
    """
    if rules.fixed_scale is not None:
        return rules.fixed_scale
    finite = [abs(float(s)) for s in scores if math.isfinite(float(s))]
    if not finite:
        return 0.0
    if rules.clip_percentile is None:
        return max(finite)
    return float(np.percentile(np.asarray(finite, dtype=np.float64), rules.clip_percentile))


def shared_scale(scales: Sequence[float]) -> float | None:
    """One range for several heatmaps: the largest of their own ranges (None when all are 0)."""
    finite = [float(s) for s in scales if math.isfinite(float(s)) and s > 0]
    return max(finite) if finite else None
