"""Colour scales for saliency heatmaps (pure Python, no dependencies).

Shared by the HTML/terminal renderers (:mod:`seqsal.render`) and the UI.

* Non-negative methods (``GRAD_L2``) use a sequential map from white to deep
  purple (ColorBrewer *Purples*).
* Signed methods (``GRAD_DOT_INPUT``, ``INTEGRATED_GRADIENTS``, ``OCCLUSION``, ``LIME``) use a diverging
  map centred on white at 0: blue for negative, red for positive (ColorBrewer
  *RdBu*, which is colour-blind safe).

Scores are first mapped to ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned) with
:func:`normalize`, then to a colour with :func:`color_for`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

__all__ = [
    "DIVERGING_STOPS",
    "EXCLUDED_COLOR",
    "SEQUENTIAL_STOPS",
    "SIGNED_METHODS",
    "color_for",
    "format_score",
    "is_signed",
    "legend_stops",
    "max_abs",
    "normalize",
    "text_color_for",
]

# seqsal.v1.Method values (kept as plain ints so this module has no dependencies).
_GRAD_L2 = 1
_GRAD_DOT_INPUT = 2
_INTEGRATED_GRADIENTS = 3
_OCCLUSION = 4
_LIME = 5

#: Methods whose scores can be negative.
SIGNED_METHODS: frozenset[int] = frozenset({_GRAD_DOT_INPUT, _INTEGRATED_GRADIENTS, _OCCLUSION, _LIME})

#: White -> deep purple (ColorBrewer Purples), for values in [0, 1].
SEQUENTIAL_STOPS: tuple[tuple[float, str], ...] = (
    (0.0, "#ffffff"),
    (0.25, "#dadaeb"),
    (0.5, "#9e9ac8"),
    (0.75, "#6a51a3"),
    (1.0, "#3f007d"),
)

#: Blue (negative) -> white (0) -> red (positive) (ColorBrewer RdBu), for values in [-1, 1].
DIVERGING_STOPS: tuple[tuple[float, str], ...] = (
    (-1.0, "#2166ac"),
    (-2.0 / 3.0, "#67a9cf"),
    (-1.0 / 3.0, "#d1e5f0"),
    (0.0, "#ffffff"),
    (1.0 / 3.0, "#fddbc7"),
    (2.0 / 3.0, "#ef8a62"),
    (1.0, "#b2182b"),
)

#: Background of a unit left out of the colour range (the attention sink, special tokens): a
#: neutral grey, drawn hatched by the HTML and UI renderers, so it never reads as a score.
EXCLUDED_COLOR = "#eeeeee"

_BLACK = "#000000"
_WHITE = "#ffffff"


def is_signed(method: int) -> bool:
    """Whether a ``seqsal.v1.Method`` produces signed scores (diverging colour map)."""
    return int(method) in SIGNED_METHODS


def max_abs(values: Sequence[float]) -> float:
    """Largest finite ``|value|`` (0.0 when there is none); NaN and infinities are ignored."""
    best = 0.0
    for v in values:
        fv = float(v)
        if math.isfinite(fv):
            best = max(best, abs(fv))
    return best


def normalize(
    values: Sequence[float],
    intensity: float = 1.0,
    *,
    signed: bool,
    scale: float | None = None,
) -> list[float]:
    """Map scores to ``[-1, 1]`` (``signed``) or ``[0, 1]`` (unsigned).

    Each value becomes ``value * intensity / scale``, clipped. ``scale`` defaults
    to :func:`max_abs` of ``values``; pass it explicitly to normalise by a
    reference set (e.g. only the prompt units). ``intensity`` > 1 saturates
    colours sooner. A zero (or non-finite) scale gives all zeros; NaN values map
    to 0; unsigned mode clips negative values to 0.
    """
    if not (math.isfinite(intensity) and intensity > 0):
        raise ValueError(f"intensity must be a finite number > 0, got {intensity!r}")
    ref = max_abs(values) if scale is None else float(scale)
    lo = -1.0 if signed else 0.0
    if not (math.isfinite(ref) and ref > 0):
        return [0.0 for _ in values]
    factor = intensity / ref
    out: list[float] = []
    for v in values:
        fv = float(v)
        if math.isnan(fv):
            out.append(0.0)
            continue
        out.append(min(1.0, max(lo, fv * factor)))
    return out


def _parse_hex(color: str) -> tuple[int, int, int]:
    h = color.strip().lstrip("#")
    if len(h) == 3:
        h = "".join(c * 2 for c in h)
    if len(h) != 6:
        raise ValueError(f"not a #rrggbb colour: {color!r}")
    try:
        return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    except ValueError as exc:
        raise ValueError(f"not a #rrggbb colour: {color!r}") from exc


def _to_hex(rgb: tuple[float, float, float]) -> str:
    r, g, b = (min(255, max(0, round(c))) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def _interpolate(stops: Sequence[tuple[float, str]], x: float) -> str:
    if x <= stops[0][0]:
        return stops[0][1]
    if x >= stops[-1][0]:
        return stops[-1][1]
    for (x0, c0), (x1, c1) in itertools.pairwise(stops):
        if x0 <= x <= x1:
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            a, b = _parse_hex(c0), _parse_hex(c1)
            return _to_hex((a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t))
    return stops[-1][1]  # pragma: no cover - stops are sorted


def color_for(value: float, signed: bool) -> str:
    """Background colour ``"#rrggbb"`` for a normalised value.

    ``signed``: ``value`` in ``[-1, 1]`` on the diverging map (0 = white);
    otherwise ``value`` in ``[0, 1]`` on the sequential map (0 = white). Values
    outside the range are clipped; NaN is treated as 0.
    """
    v = float(value)
    if math.isnan(v):
        v = 0.0
    stops = DIVERGING_STOPS if signed else SEQUENTIAL_STOPS
    return _interpolate(stops, v)


def _relative_luminance(color: str) -> float:
    def channel(c: int) -> float:
        s = c / 255.0
        return s / 12.92 if s <= 0.04045 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = _parse_hex(color)
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def text_color_for(bg_hex: str) -> str:
    """``"#000000"`` or ``"#ffffff"``, whichever contrasts more with ``bg_hex`` (WCAG contrast ratio)."""
    lum = _relative_luminance(bg_hex)
    contrast_black = (lum + 0.05) / 0.05
    contrast_white = 1.05 / (lum + 0.05)
    return _BLACK if contrast_black >= contrast_white else _WHITE


def legend_stops(signed: bool) -> list[tuple[float, str]]:
    """The colour map's stops as ``(normalised value, "#rrggbb")``, in increasing value order."""
    return list(DIVERGING_STOPS if signed else SEQUENTIAL_STOPS)


def format_score(value: float) -> str:
    """A score for display: 4 decimals, or scientific notation for tiny non-zero values."""
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v == 0.0:
        v = 0.0  # no "-0.0000"
    elif abs(v) < 1e-3:
        return f"{v:.3e}"
    return f"{v:.4f}"
