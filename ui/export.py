"""Export the current heatmap: a standalone HTML page and JSON, with download buttons.

The HTML comes from :func:`seqsal.render.render_html` (inline CSS, no scripts, every text
escaped), so prompts and responses containing markup are shown as text.
"""

from __future__ import annotations

import json
import re
from typing import Any

import streamlit as st

from seqsal.render import render_html, response_to_json
from seqsal.scale import ScaleRules
from seqsal.v1 import saliency_pb2


def html_export(
    response: saliency_pb2.SaliencyResponse,
    method_index: int,
    *,
    intensity: float = 1.0,
    chips: bool = False,
    title: str = "seqsal saliency",
    rules: ScaleRules | None = None,
) -> str:
    """The heatmap as a standalone HTML page (escaped; no scripts), on the UI's scale rules."""
    return render_html(response, method_index, intensity=intensity, chips=chips, title=title, rules=rules)


def json_export(
    response: saliency_pb2.SaliencyResponse,
    *,
    view: dict[str, str],
    link: str = "",
    generation: dict[str, Any] | None = None,
) -> str:
    """The saliency response (proto JSON) with the view state that produced it."""
    doc: dict[str, Any] = {"view": view}
    if link:
        doc["link"] = link
    if generation is not None:
        doc["generation"] = generation
    doc["saliency"] = response_to_json(response)
    return json.dumps(doc, ensure_ascii=False, indent=2)


def file_stem(title: str) -> str:
    """A safe file name stem from a title."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", title).strip("-.")[:60]
    return stem or "seqsal"


def download_buttons(
    response: saliency_pb2.SaliencyResponse,
    method_index: int,
    *,
    side: str,
    title: str,
    intensity: float,
    chips: bool,
    view: dict[str, str],
    link: str,
    generation: dict[str, Any] | None,
    rules: ScaleRules | None = None,
) -> None:
    """Two download buttons (HTML page, JSON); the files are built only when clicked."""
    stem = file_stem(title)
    left, right = st.columns(2)
    with left:
        st.download_button(
            "Download HTML",
            data=lambda: html_export(
                response, method_index, intensity=intensity, chips=chips, title=title, rules=rules
            ),
            file_name=f"{stem}.html",
            mime="text/html",
            key=f"export_html_{side}",
            on_click="ignore",
            icon=":material/download:",
            width="stretch",
        )
    with right:
        st.download_button(
            "Download JSON",
            data=lambda: json_export(response, view=view, link=link, generation=generation),
            file_name=f"{stem}.json",
            mime="application/json",
            key=f"export_json_{side}",
            on_click="ignore",
            icon=":material/data_object:",
            width="stretch",
        )
