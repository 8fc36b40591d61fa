"""Side-by-side (paper section 4.3): the pinned side's own target, and a colour range shared by both sides.

The pinned side keeps its prompt, model and response; what it explains can still change: its
*Explain* choice (generated response, reference target, contrastive foil, as far as the pinned
example has a reference or a foil) is its own widget here, so neither side has to be unpinned to
compare, e.g., the pinned side's reference target against the current side's generated response.
Each side also keeps its own selection.

By default each heatmap is scaled on its own (its largest prompt score is the darkest colour),
so a side whose scores are 100 times smaller looks just as dark. With *Shared colour scale* both
are drawn on one range, the larger of the two ranges (:func:`seqsal.scale.shared_scale`), so
that equal colours mean equal scores. The HTML export of each side uses the same range.
"""

from __future__ import annotations

from dataclasses import replace

import streamlit as st

from seqsal import render
from seqsal.scale import shared_scale
from ui import session
from ui.side_loop import SideResult, set_payload
from ui.state import TARGET_KIND_LABELS, TARGET_KINDS, DisplayState, SideState, TargetKind

#: Widget key of the pinned side's Explain choice.
PIN_TARGET_KEY = "w_pin_target_kind"


def pinned_kinds(pinned: SideState) -> list[TargetKind]:
    """The target kinds the pinned side can explain without editing it."""
    kinds: list[TargetKind] = ["candidate"]
    if pinned.reference:
        kinds.append("reference")
    if pinned.foil:
        kinds.append("foil")
    return [k for k in TARGET_KINDS if k in kinds or k == pinned.target_kind]


def _on_pinned_target() -> None:
    ss = st.session_state
    pinned = ss.get(session.PINNED)
    kind = ss.get(PIN_TARGET_KEY)
    if isinstance(pinned, SideState) and kind in TARGET_KINDS:
        ss[session.PINNED] = replace(pinned, target_kind=kind, selection=())
        ss[session.selection_key("pin")] = ()


def pinned_target_picker(pinned: SideState) -> None:
    """The pinned side's Explain choice (changes what it explains, keeps it pinned)."""
    ss = st.session_state
    kinds = pinned_kinds(pinned)
    if len(kinds) < 2:
        return
    if ss.get(PIN_TARGET_KEY) != pinned.target_kind:
        ss[PIN_TARGET_KEY] = pinned.target_kind
    st.radio(
        "Explain (pinned side)",
        kinds,
        format_func=lambda k: TARGET_KIND_LABELS[k],
        key=PIN_TARGET_KEY,
        horizontal=True,
        on_change=_on_pinned_target,
        help="What the pinned side explains; it stays pinned (prompt, model and response are kept).",
    )


def shared_scale_toggle() -> None:
    st.toggle(
        "Shared colour scale",
        key=session.D["shared_scale"],
        help="Draw both sides on one colour range (the larger of their own ranges), so equal colours "
        "mean equal scores. Off: each side is scaled on its own.",
    )


def own_scale(result: SideResult, display: DisplayState) -> float:
    """The ``|score|`` at which a side's own colour range ends (0.0 without a heatmap)."""
    if result.response is None:
        return 0.0
    return render.heatmap(result.response, result.method_index, rules=display.rules_for(result.state)).scale


def share_scale(results: list[SideResult], display: DisplayState) -> float | None:
    """Redraw ``results`` on one colour range when the display asks for it; returns the range."""
    if not display.shared_scale:
        return None
    drawn = [r for r in results if r.response is not None]
    if len(drawn) < 2:
        return None
    scale = shared_scale([own_scale(r, display) for r in drawn])
    if scale is None:
        return None
    for result in drawn:
        set_payload(result, display, replace(display.rules_for(result.state), fixed_scale=scale))
    return scale
