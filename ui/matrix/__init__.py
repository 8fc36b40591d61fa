"""The matrix view of a response: target segments as rows, prompt segments as columns.

Each cell is the saliency of a prompt segment (column) for one target segment (row), taken from
what the background precompute (``SaliencyAllSegments``) returned for that target segment, so
the view costs no call. Rows not precomputed yet are drawn empty. One colour range covers the
whole matrix (the largest |cell|, or the display's percentile, by the rules of
:mod:`seqsal.scale`, with the attention sink and special tokens left out unless the display
includes them), so rows can be compared. Columns are the prompt units the heatmap draws.

A click on a row is the same as a click on that target segment in the heatmap: it sets the
side's selection (shift-click adds or removes it; a whitespace-only segment's row is inert, as
its heatmap unit is), numbered as the heatmap's clicks are, so a
click made while a run is in flight is applied by the next run (:func:`ui.session.apply_numbered_click`).
Like the heatmap it is a bidirectional ``st.components.v2`` component (``matrix.js`` draws the
table with DOM text nodes; ``matrix.css``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import streamlit as st

from seqsal import colors, render
from seqsal.scale import ScaleRules, reference_scale
from seqsal.v1 import common_pb2, saliency_pb2
from ui.heatmap import declare, numbered_selection

_HERE = Path(__file__).resolve().parent
COMPONENT_NAME = "seqsal_matrix"
#: Beyond this many prompt units (e.g. tokens of a long prompt) the matrix is not drawn.
MAX_COLUMNS = 400
LABEL_CHARS = 28

_render = declare(COMPONENT_NAME, _HERE, "matrix")


def component_key(side: str) -> str:
    """Session-state key of a side's matrix component."""
    return f"seqsal_matrix_{side}"


def _label(text: str) -> str:
    flat = " ".join(text.split()) or "⏎"
    return flat if len(flat) <= LABEL_CHARS else flat[: LABEL_CHARS - 1] + "…"


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def build_matrix(
    responses: Mapping[int, saliency_pb2.SaliencyResponse],
    target_segments: Sequence[common_pb2.Segment],
    method_index: Callable[[saliency_pb2.SaliencyResponse], int],
    *,
    side: str,
    selection: Sequence[int] = (),
    intensity: float = 1.0,
    rules: ScaleRules | None = None,
) -> dict[str, Any] | None:
    """The component's data: a row per target segment (cells from its precomputed response).

    ``responses`` maps target segment indices to the response explaining that segment alone;
    None when there is none yet, or too many prompt units to draw.
    """
    rules = rules or ScaleRules()
    if not responses:
        return None
    rows_units: dict[int, list[render.Unit]] = {}
    for index, response in responses.items():
        units = render.units(response, method_index(response), True, rules)
        rows_units[index] = [u for u in units if u.part == common_pb2.PROMPT]
    first = next(iter(rows_units.values()))
    if not first or len(first) > MAX_COLUMNS:
        return None
    any_response = next(iter(responses.values()))
    scores = any_response.scores
    signed = bool(scores) and colors.is_signed(scores[method_index(any_response)].method)
    counted = [u.score for us in rows_units.values() for u in us if not u.excluded]
    scale = reference_scale(counted, rules)
    rows = []
    for index, segment in enumerate(target_segments):
        units = rows_units.get(index)
        row: dict[str, Any] = {
            "index": index,
            "text": _label(segment.text),
            "title": segment.text,
            "inert": not segment.text.strip(),  # whitespace only: not selectable, as in the heatmap
        }
        if units is None or len(units) != len(first):
            row.update(ready=False, colors=[], scores=[])
        else:
            values = colors.normalize([u.score for u in units], intensity, signed=signed, scale=scale)
            row.update(
                ready=True,
                colors=[
                    colors.EXCLUDED_COLOR if u.excluded else colors.color_for(v, signed)
                    for u, v in zip(units, values, strict=True)
                ],
                scores=[_finite(u.score) for u in units],
            )
        rows.append(row)
    return {
        "for_side": side,
        "columns": [{"text": _label(u.text), "title": u.text, "excluded": u.excluded} for u in first],
        "rows": rows,
        "selected": sorted(i for i in selection if 0 <= i < len(rows)),
        "signed": signed,
        "max": scale / intensity if scale > 0 else 0.0,
        "ready": sum(1 for r in rows if r["ready"]),
    }


def mount(data: dict[str, Any], *, side: str, on_select: Callable[[], None]) -> None:
    """Draw the matrix; a row click calls ``on_select`` (then read :func:`clicked`)."""
    _render(key=component_key(side), data=data, on_selection_change=on_select)


def clicked(side: str) -> tuple[tuple[int, ...], int] | None:
    """The selection the last row click made: (target segment indices, sequence number) or None."""
    return numbered_selection(st.session_state.get(component_key(side)))
