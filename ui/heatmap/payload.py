"""The heatmap component's data: a plain, JSON-serialisable dict built from a SaliencyResponse.

Colours are computed here with :mod:`seqsal.render` / :mod:`seqsal.colors` (the same scale as
the HTML export and the CLI), so the JavaScript only draws. Units are sent column-wise (one
list per field) to keep the payload small at thousands of tokens.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from seqsal import colors, render
from seqsal.scale import ScaleRules
from seqsal.v1 import common_pb2, saliency_pb2

_PART = {common_pb2.PROMPT: "prompt", common_pb2.TARGET: "target", common_pb2.FOIL: "foil"}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def build_payload(
    response: saliency_pb2.SaliencyResponse,
    method_index: int,
    *,
    side: str,
    selection: tuple[int, ...] = (),
    intensity: float = 1.0,
    chips: bool = False,
    compact: bool = False,
    caption: str = "",
    rules: ScaleRules | None = None,
    clicks: int = 0,
    click_seq: int = 0,
    target_label: str = "response",
) -> dict[str, Any]:
    """Everything the component draws for one response and one method.

    ``units`` holds parallel lists: ``part`` ("prompt" | "target" | "foil"), ``index`` (the
    unit's index among the segments of its part; for the target this is the number a click
    sends back), ``text``, ``score`` (raw, ``None`` if not finite), ``color`` (background),
    ``fg`` (text colour with enough contrast), ``special``, ``marker`` (a chat-template marker:
    text of the prompt, drawn dimmed like a special token) and ``excluded`` (left out of the colour
    range by ``rules``: drawn hatched, value on hover). ``selected`` lists the selected target
    segments; with an empty selection the whole target is explained (``whole_target``).
    ``clicks`` counts the clicks the page has handled on this side: every click then changes
    the data, so the component redraws (and drops its optimistic marks) even when the answer is
    the view it already shows (a failed call, a click that changed nothing).
    """
    hm = render.heatmap(response, method_index, intensity=intensity, rules=rules)
    counters: dict[str, int] = {}
    part: list[str] = []
    index: list[int] = []
    text: list[str] = []
    score: list[float | None] = []
    color: list[str] = []
    fg: list[str] = []
    special: list[bool] = []
    excluded: list[bool] = []
    marker: list[bool] = []
    for unit, c in zip(hm.units, hm.colors, strict=True):
        name = _PART.get(unit.part, "prompt")
        counters[name] = max(counters.get(name, 0), unit.index + 1)
        part.append(name)
        index.append(unit.index)
        text.append(unit.text)
        score.append(_finite(unit.score))
        color.append(c)
        fg.append(colors.text_color_for(c))
        special.append(unit.special)
        excluded.append(unit.excluded)
        marker.append(unit.marker)
    n_target = counters.get("target", 0)
    selected = sorted(i for i in selection if 0 <= i < n_target)
    sat = hm.saturation if hm.scale > 0 else 0.0
    digest = hashlib.sha256("\x00".join(text).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return {
        "side": side,
        "units": {
            "part": part,
            "index": index,
            "text": text,
            "score": score,
            "color": color,
            "fg": fg,
            "special": special,
            "excluded": excluded,
            "marker": marker,
        },
        "selected": selected,
        "whole_target": not selected,
        "target_count": n_target,
        "text_key": digest,
        "chips": chips,
        "compact": compact,
        "legend": {
            "method": render.method_name(hm.method),
            "signed": hm.signed,
            "stops": [[x, c] for x, c in colors.legend_stops(hm.signed)],
            "min": -sat if hm.signed else 0.0,
            "max": sat,
            "intensity": hm.intensity,
            "rules": hm.rules.describe(),
            "percentile": hm.rules.clip_percentile,
            #: what the target is, in words ("reference target", "generated response"...)
            "target": target_label,
        },
        "caption": caption,
        "clicks": clicks,
        #: the sequence number of the last click applied (the component's pending click is newer)
        "click_seq": click_seq,
    }


def unit_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The payload's units as one dict per unit (for tests and the data view)."""
    cols = payload["units"]
    keys = list(cols)
    return [dict(zip(keys, values, strict=True)) for values in zip(*(cols[k] for k in keys), strict=True)]
