"""The view state in ``st.session_state``: widget keys, first-run seeding from the URL, callbacks.

The widgets of the current side and the display settings own their values under the ``w_*``
keys below; selections (set by heatmap clicks) and the pinned side live under plain keys.
:func:`current_view` reads it all back as a :class:`ui.state.ViewState`, and
:func:`sync_query_params` writes that to the URL at the end of every run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from dataclasses import replace
from typing import Any

import streamlit as st

from ui import heatmap
from ui.examples import Example, baselines, side_for_example
from ui.state import (
    DisplayState,
    SideState,
    ViewState,
    align_target_kind,
    from_query,
    to_query,
)

# Widget keys of the current side's fields (SideState field -> session-state key).
W: dict[str, str] = {
    "prompt": "w_prompt",
    "model": "w_model",
    "chat_template": "w_chat",
    "target_kind": "w_target_kind",
    "candidate": "w_candidate",
    "reference": "w_reference",
    "foil": "w_foil",
    "method": "w_method",
    "granularity": "w_granularity",
    "regex": "w_regex",
    "n": "w_n",
    "max_new_tokens": "w_max_new",
    "temperature": "w_temperature",
    "seed": "w_seed",
    "stop": "w_stop",
}
# Widget keys of the display settings.
D: dict[str, str] = {
    "intensity": "w_intensity",
    "chips": "w_chips",
    "compact": "w_compact",
    "scale_all": "w_scale_all",
    "clip": "w_clip",
    "aggregate": "w_aggregate",
    "shared_scale": "w_shared_scale",
    "template": "w_template",
}

EXAMPLE_ID = "v_example_id"
EXAMPLE_PICK = "w_example"
PINNED = "pinned"
NOTES = "v_link_notes"
INITIALIZED = "v_initialized"
SIDES = ("main", "pin")


def selection_key(side: str) -> str:
    return f"sel_{side}"


def clicks_key(side: str) -> str:
    """Session key: how many heatmap clicks on ``side`` the page has handled."""
    return f"clicks_{side}"


def generation_key(side: str) -> str:
    return f"gen_{side}"


def force_key(side: str) -> str:
    return f"force_gen_{side}"


# --------------------------------------------------------------------------- stop strings <-> text


def stop_to_text(stop: tuple[str, ...]) -> str:
    """Stop strings as editable text: one per line, newline and tab written ``\\n`` and ``\\t``."""
    return "\n".join(s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") for s in stop)


_ESCAPE = re.compile(r"\\(\\|n|t)")


def text_to_stop(text: str) -> tuple[str, ...]:
    """The inverse of :func:`stop_to_text` (blank lines are skipped)."""
    out: list[str] = []
    for line in text.splitlines():
        if not line:
            continue
        out.append(_ESCAPE.sub(lambda m: {"\\": "\\", "n": "\n", "t": "\t"}[m.group(1)], line))
    return tuple(out)


# --------------------------------------------------------------------------- state <-> session


def write_side(ss: MutableMapping[str, Any], side: SideState) -> None:
    """Put a side's values into the current side's widget keys (call before the widgets draw)."""
    for name, key in W.items():
        value = getattr(side, name)
        ss[key] = stop_to_text(value) if name == "stop" else value
    ss[EXAMPLE_ID] = side.example_id
    ss[EXAMPLE_PICK] = side.example_id
    ss[selection_key("main")] = tuple(side.selection)


#: The colour-range widget's value for "the largest |score|" (``DisplayState.clip`` None): the
#: 100th percentile is the largest, and a selectbox shows a placeholder for a None value.
CLIP_LARGEST = 100.0


def write_display(ss: MutableMapping[str, Any], display: DisplayState) -> None:
    for name, key in D.items():
        value = getattr(display, name)
        ss[key] = CLIP_LARGEST if name == "clip" and value is None else value


def _clip(value: Any) -> float | None:
    return None if value is None or float(value) >= CLIP_LARGEST else float(value)


def read_side(ss: Mapping[str, Any], default_model: str = "") -> SideState:
    """The current side from its widget keys (missing keys take the defaults)."""
    d = SideState()
    values: dict[str, Any] = {}
    for name, key in W.items():
        if key in ss:
            values[name] = ss[key]
    if "stop" in values:
        values["stop"] = text_to_stop(str(values["stop"]))
    if values.get("model") == default_model:
        values["model"] = ""
    values["example_id"] = ss.get(EXAMPLE_ID, "")
    values["selection"] = tuple(ss.get(selection_key("main"), ()))
    for name in ("n", "max_new_tokens", "seed", "candidate"):
        if name in values:
            values[name] = int(values[name])
    if "temperature" in values:
        values["temperature"] = float(values["temperature"])
    return replace(d, **values)


def read_display(ss: Mapping[str, Any]) -> DisplayState:
    d = DisplayState()
    return DisplayState(
        intensity=float(ss.get(D["intensity"], d.intensity)),
        chips=bool(ss.get(D["chips"], d.chips)),
        compact=bool(ss.get(D["compact"], d.compact)),
        scale_all=bool(ss.get(D["scale_all"], d.scale_all)),
        clip=_clip(ss.get(D["clip"], d.clip)),
        aggregate=str(ss.get(D["aggregate"], d.aggregate)),
        shared_scale=bool(ss.get(D["shared_scale"], d.shared_scale)),
        template=bool(ss.get(D["template"], d.template)),
    )


def pinned_side(ss: Mapping[str, Any]) -> SideState | None:
    pinned = ss.get(PINNED)
    if not isinstance(pinned, SideState):
        return None
    return replace(pinned, selection=tuple(ss.get(selection_key("pin"), ())))


def current_view(ss: Mapping[str, Any], default_model: str = "") -> ViewState:
    """The whole view as it stands in the session."""
    return ViewState(current=read_side(ss, default_model), pinned=pinned_side(ss), display=read_display(ss))


def keep_widget_values(ss: MutableMapping[str, Any]) -> None:
    """Keep values of widgets that are not drawn in every run (Streamlit drops those otherwise)."""
    for key in (*W.values(), *D.values(), EXAMPLE_PICK):
        if key in ss:
            ss[key] = ss[key]


def init_session(
    ss: MutableMapping[str, Any], query: Mapping[str, Any], examples: list[Example]
) -> list[str]:
    """On a session's first run: seed the state from the URL (or the first example). Returns notes."""
    if ss.get(INITIALIZED):
        return list(ss.get(NOTES, []))
    view, notes = from_query(query, baselines(examples))
    current = view.current
    if not current.prompt and examples:
        # No prompt in the link: start from the first example, keeping the link's other settings.
        chosen = examples[0]
        loaded = side_for_example(chosen, current)
        current = replace(loaded, selection=current.selection) if "sel" in query else loaded
    write_side(ss, current)
    write_display(ss, view.display)
    if view.pinned is not None:
        ss[PINNED] = replace(view.pinned, selection=())
        ss[selection_key("pin")] = view.pinned.selection
    ss[NOTES] = notes
    ss[INITIALIZED] = True
    return notes


def sync_query_params(view: ViewState, examples: list[Example]) -> dict[str, str]:
    """Write the view to the URL query (only when it changed); returns the query."""
    query = to_query(view, baselines(examples))
    if st.query_params.to_dict() != query:
        st.query_params.from_dict(query)
    return query


# --------------------------------------------------------------------------- callbacks


def load_example(example: Example) -> None:
    """Load an example into the current side (a callback: runs before the widgets draw)."""
    ss = st.session_state
    side = align_target_kind(side_for_example(example, read_side(ss)), pinned_side(ss))
    write_side(ss, side)


def load_own_prompt() -> None:
    """ "— your own prompt —": keep the prompt text to edit, drop everything the example brought.

    The example's reference target, foil, stop strings, granularity regex and max new tokens
    belonged to its prompt; a new prompt is explained against its own generated response.
    """
    ss = st.session_state
    side = read_side(ss)
    d = SideState()
    write_side(
        ss,
        replace(
            d,
            prompt=side.prompt,
            model=side.model,
            chat_template=side.chat_template,
            method=side.method,
            granularity=side.granularity if side.granularity != "CUSTOM_REGEX" else d.granularity,
            n=side.n,
            temperature=side.temperature,
            seed=side.seed,
        ),
    )


def on_target_kind() -> None:
    """Switching to the contrastive mode picks a signed method: a contrast has a direction, which
    GRAD_L2 (a norm) cannot show."""
    ss = st.session_state
    if ss.get(W["target_kind"]) == "foil" and ss.get(W["method"], "GRAD_L2") == "GRAD_L2":
        ss[W["method"]] = "GRAD_DOT_INPUT"


def click_seq_key(side: str) -> str:
    """Session key: the sequence number of the last heatmap click applied on ``side``."""
    return f"click_seq_{side}"


def on_select(side: str) -> None:
    """Heatmap click on ``side``: apply the selection it made, once (by its sequence number).

    The click callback and the start of every run both call this, so a click is applied even when
    its callback did not run (a click made while a run was in flight).
    """
    apply_numbered_click(side, heatmap.clicked(side))


def apply_numbered_click(side: str, click: tuple[tuple[int, ...], int] | None) -> None:
    """Apply a numbered selection (heatmap or matrix view) to ``side``, once, newest click wins."""
    ss = st.session_state
    if click is None:
        return
    indices, seq = click
    if seq <= int(ss.get(click_seq_key(side), 0)):
        return
    ss[click_seq_key(side)] = seq
    ss[clicks_key(side)] = int(ss.get(clicks_key(side), 0)) + 1
    ss[selection_key(side)] = indices


def pin_current(default_model: str = "") -> None:
    """Pin the current side (prompt, target, model, settings, response and selection)."""
    ss = st.session_state
    side = read_side(ss, default_model)
    ss[PINNED] = replace(side, selection=())
    ss[selection_key("pin")] = side.selection
    if generation_key("main") in ss:
        ss[generation_key("pin")] = ss[generation_key("main")]
    for suffix in ("ctx", "spans"):
        if f"sel_{suffix}_main" in ss:
            ss[f"sel_{suffix}_pin"] = ss[f"sel_{suffix}_main"]


def unpin() -> None:
    ss = st.session_state
    for key in (PINNED, selection_key("pin"), generation_key("pin"), "sel_ctx_pin", "sel_spans_pin"):
        ss.pop(key, None)


def force_generation(side: str) -> None:
    """The Generate button: sample again (next seed) when sampling, else call the server again."""
    ss = st.session_state
    if side == "main" and float(ss.get(W["temperature"], 0.0)) > 0:
        ss[W["seed"]] = int(ss.get(W["seed"], 0)) + 1
    else:
        ss[force_key(side)] = True
