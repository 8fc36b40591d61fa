"""The clickable heatmap: a bidirectional ``st.components.v2`` component.

Python sends a plain dict (:func:`ui.heatmap.payload.build_payload`) as ``data``; the
JavaScript (``heatmap.js``, styles in ``heatmap.css``) draws it with DOM text nodes and, when a
response segment is clicked, sets the state ``selection`` to ``{"indices", "seq", "side"}``: the
selection the click makes, numbered. The ``on_select`` callback runs before the next script run
and reads it with :func:`clicked`; state persists in the page, so a click whose callback was
coalesced away (made while a run was in flight) is still read by the next run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st

from ui.heatmap.payload import build_payload, unit_rows

__all__ = ["build_payload", "clicked", "component_key", "mount", "numbered_selection", "unit_rows"]

_HERE = Path(__file__).resolve().parent
COMPONENT_NAME = "seqsal_heatmap"


def component_js(folder: Path, stem: str) -> str:
    """The script of a component: the click rule every clickable view shares (``selection.js``),
    then ``folder/stem.js``."""
    shared = (_HERE / "selection.js").read_text(encoding="utf-8")
    return shared + "\n" + (folder / f"{stem}.js").read_text(encoding="utf-8")


def declare(name: str, folder: Path, stem: str) -> Any:
    """A bidirectional component from ``folder/stem.js`` (after the click rule) and ``folder/stem.css``."""
    return st.components.v2.component(
        name, js=component_js(folder, stem), css=(folder / f"{stem}.css").read_text(encoding="utf-8")
    )


_render = declare(COMPONENT_NAME, _HERE, "heatmap")


def component_key(side: str) -> str:
    """Session-state key of a side's heatmap component."""
    return f"seqsal_heatmap_{side}"


def mount(payload: dict[str, Any], *, side: str, on_select: Callable[[], None]) -> None:
    """Draw the heatmap for ``payload``; clicks call ``on_select`` (then read :func:`clicked`)."""
    _render(key=component_key(side), data=payload, on_selection_change=on_select)


def clicked(side: str) -> tuple[tuple[int, ...], int] | None:
    """The last selection a click on ``side`` made: (target segment indices, sequence number) or ``None``."""
    return numbered_selection(st.session_state.get(component_key(side)))


def numbered_selection(state: object) -> tuple[tuple[int, ...], int] | None:
    """A component's ``selection`` state ``{"indices", "seq"}`` (the heatmap's and the matrix view's):
    (target segment indices, sequence number), or None when absent or malformed."""
    value = state.get("selection") if isinstance(state, dict) else None
    if not isinstance(value, dict):
        return None
    indices, seq = value.get("indices"), value.get("seq")
    if not isinstance(indices, list) or not isinstance(seq, int) or isinstance(seq, bool):
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        return None
    return tuple(sorted(set(indices))), seq
