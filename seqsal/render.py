"""Render a ``SaliencyResponse`` as a heatmap over running text: HTML, JSON, terminal (rich).

The display units are the response's segments (when present) or its tokens.
Each unit is coloured by its score for one method (see :mod:`seqsal.colors`);
the colour scale is the largest ``|score|`` (or a percentile of them) over the
prompt's units — the explained (selected) target units, the attention-sink
position and special tokens left out, by the rules of :mod:`seqsal.scale` —
divided by an ``intensity`` factor, so ``intensity=2`` saturates at half that
score. Units beyond the scale are clipped to the end colour; units left out of
the range are drawn hatched (HTML, UI) or uncoloured (terminal), their value on
hover.

All prompt/target/model text is untrusted: the HTML escapes every string with
``html.escape(..., quote=True)``, and the terminal output shows control
characters (ESC and the like) as visible symbols instead of emitting them.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from rich.console import Console
from rich.style import Style
from rich.table import Table
from rich.text import Text

from seqsal import colors
from seqsal.scale import ScaleRules, aggregate, excluded_tokens, reference_scale
from seqsal.segmentation import template_markers, template_tokens
from seqsal.v1 import common_pb2, saliency_pb2

__all__ = [
    "Heatmap",
    "Unit",
    "color_scale",
    "heatmap",
    "method_name",
    "render_html",
    "render_json",
    "render_table",
    "render_terminal",
    "response_to_json",
    "selected_token_indices",
    "units",
]

_PROMPT = common_pb2.PROMPT
_TARGET = common_pb2.TARGET
_FOIL = common_pb2.FOIL

_PART_CLASS = {_PROMPT: "p-prompt", _TARGET: "p-target", _FOIL: "p-foil"}
_PART_LABEL = {_PROMPT: "prompt", _TARGET: "target", _FOIL: "foil"}


@dataclass(frozen=True, slots=True)
class Unit:
    """One display unit: a segment, or a token when there are no segments."""

    #: ``seqsal.v1.Part`` value.
    part: int
    #: The unit's text (a special token's literal form, e.g. ``"<s>"``).
    text: str
    #: Raw score for the chosen method.
    score: float
    #: First token of the unit (index into ``response.tokens``).
    token_start: int
    #: One past the last token of the unit.
    token_end: int
    #: True when the unit covers a selected (explained) target token.
    selected: bool
    #: True when every token of the unit is special (BOS, EOS...).
    special: bool
    #: True when the unit is left out of the colour range (see :mod:`seqsal.scale`).
    excluded: bool = False
    #: The unit's index among the segments (or tokens) of its part: what a click on it selects.
    #: Pieces split off one segment share it.
    index: int = 0
    #: True when every token of the unit is a chat-template marker (``<|im_end|>``...): text of the
    #: prompt, drawn dimmed and scaled like a special token (:func:`seqsal.segmentation.template_markers`).
    marker: bool = False


@dataclass(frozen=True, slots=True)
class Heatmap:
    """Units with their normalised values and colours, ready to draw."""

    units: list[Unit]
    #: Normalised values, in [-1, 1] (signed) or [0, 1].
    values: list[float]
    #: Background colour ``"#rrggbb"`` per unit.
    colors: list[str]
    #: ``seqsal.v1.Method`` value of the scores (METHOD_UNSPECIFIED when the response has none).
    method: int
    signed: bool
    #: Reference ``max |score|`` (see :func:`color_scale`); 0.0 when every score is 0.
    scale: float
    intensity: float
    #: True when the units are segments (False: tokens).
    from_segments: bool
    rules: ScaleRules = field(default_factory=ScaleRules)

    @property
    def saturation(self) -> float:
        """The raw ``|score|`` at which colours saturate: ``scale / intensity``."""
        return self.scale / self.intensity


# --------------------------------------------------------------------------- units


def method_name(method: int) -> str:
    """``"GRAD_L2"`` etc.; the number itself for unknown values."""
    try:
        return common_pb2.Method.Name(method)
    except ValueError:
        return str(int(method))


def _granularity_name(granularity: int) -> str:
    try:
        return common_pb2.Granularity.Name(granularity)
    except ValueError:
        return str(int(granularity))


def selected_token_indices(response: saliency_pb2.SaliencyResponse) -> set[int]:
    """Indices into ``response.tokens`` of the selected target tokens.

    ``target_mask`` has one bool per TARGET token; an empty mask means every
    target token (the request's convention).
    """
    target_idx = [i for i, tok in enumerate(response.tokens) if tok.part == _TARGET]
    mask = list(response.target_mask)
    if not mask:
        return set(target_idx)
    return {i for k, i in enumerate(target_idx) if k < len(mask) and mask[k]}


def _token_scores(response: saliency_pb2.SaliencyResponse, method_index: int) -> list[float]:
    n = len(response.tokens)
    if len(response.scores) == 0:
        return [0.0] * n
    if not 0 <= method_index < len(response.scores):
        raise IndexError(
            f"method_index {method_index} out of range: the response has {len(response.scores)} method(s)"
        )
    scores = [float(s) for s in response.scores[method_index].scores[:n]]
    return scores + [0.0] * (n - len(scores))


def _method_of(response: saliency_pb2.SaliencyResponse, method_index: int) -> int:
    if len(response.scores) == 0:
        return common_pb2.METHOD_UNSPECIFIED
    if not 0 <= method_index < len(response.scores):
        raise IndexError(
            f"method_index {method_index} out of range: the response has {len(response.scores)} method(s)"
        )
    return int(response.scores[method_index].method)


def _split_runs(flags: Sequence[bool]) -> list[tuple[int, int, bool]]:
    """Maximal runs ``(start, end, flag)`` of equal consecutive flags; an excluded token is its own run."""
    runs: list[tuple[int, int, bool]] = []
    for k, flag in enumerate(flags):
        if runs and not flag and not runs[-1][2] and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1, False)
        else:
            runs.append((k, k + 1, bool(flag)))
    return runs


def units(
    response: saliency_pb2.SaliencyResponse,
    method_index: int = 0,
    use_segments: bool = True,
    rules: ScaleRules | None = None,
) -> list[Unit]:
    """Display units in order: the segments when present and ``use_segments``, else the tokens.

    A segment's score aggregates the scores of its tokens that ``rules`` count (the sum, by
    default: the server's own ``scores[method_index]`` when every token counts). A token left
    out (the attention sink, a special token) is split off its segment as a unit of its own,
    ``excluded``, with its own score, when the segment's text is its tokens' texts joined.
    Raises ``IndexError`` for a ``method_index`` the response has no scores for (a response
    without any scores gives every unit 0.0).
    """
    rules = rules or ScaleRules()
    tok_scores = _token_scores(response, method_index)
    selected = selected_token_indices(response)
    tokens = response.tokens
    n = len(tokens)
    markers = template_markers(tokens)
    special = [bool(t.special) or m for t, m in zip(tokens, markers, strict=True)]
    template = None if rules.include_template else template_tokens(tokens, rules.user_text)
    excluded = excluded_tokens(special, rules, template)
    out: list[Unit] = []
    if use_segments and len(response.segments) > 0:
        counters: dict[int, int] = {}
        for seg in sorted(response.segments, key=lambda s: (s.token_start, s.token_end)):
            a, b = max(0, seg.token_start), min(n, seg.token_end)
            index = counters.get(int(seg.part), 0)
            counters[int(seg.part)] = index + 1

            def unit(text: str, score: float, lo: int, hi: int, excl: bool, seg=seg, index=index) -> Unit:
                return Unit(
                    part=int(seg.part),
                    text=text,
                    score=score,
                    token_start=lo,
                    token_end=hi,
                    selected=any(i in selected for i in range(lo, hi)),
                    special=hi > lo and all(tokens[i].special for i in range(lo, hi)),
                    excluded=excl,
                    index=index,
                    marker=hi > lo and all(markers[i] for i in range(lo, hi)),
                )

            counted = [i for i in range(a, b) if not excluded[i]]
            if len(counted) == b - a:
                if rules.aggregate == "sum" and method_index < len(seg.scores):
                    score = float(seg.scores[method_index])
                else:
                    score = aggregate(tok_scores[a:b], rules)
                out.append(unit(seg.text, score, int(seg.token_start), int(seg.token_end), False))
                continue
            if not counted:
                out.append(unit(seg.text, aggregate(tok_scores[a:b], rules), a, b, True))
                continue
            score = aggregate([tok_scores[i] for i in counted], rules)
            if "".join(tokens[i].text for i in range(a, b)) != seg.text:
                # Text that is not its tokens' texts joined (a decoder that rewrites): keep it whole.
                out.append(unit(seg.text, score, a, b, False))
                continue
            for lo, hi, excl in _split_runs(excluded[a:b]):
                lo, hi = a + lo, a + hi
                text = "".join(tokens[i].text for i in range(lo, hi))
                out.append(unit(text, tok_scores[lo] if excl else score, lo, hi, excl))
        return out
    counters = {}
    for i, tok in enumerate(tokens):
        index = counters.get(int(tok.part), 0)
        counters[int(tok.part)] = index + 1
        out.append(
            Unit(
                part=int(tok.part),
                text=tok.text,
                score=tok_scores[i],
                token_start=i,
                token_end=i + 1,
                selected=i in selected,
                special=bool(tok.special),
                excluded=excluded[i],
                index=index,
                marker=markers[i],
            )
        )
    return out


def color_scale(display_units: Sequence[Unit], rules: ScaleRules | None = None) -> float:
    """Reference ``|score|`` for the colour scale (the maximum, or ``rules.clip_percentile``).

    Over the PROMPT units, leaving out excluded units (the attention sink and special tokens
    unless ``rules`` include them) and selected target units. Falls back to every counted,
    unselected unit, then to every unit, when that is 0; 0.0 when all scores are 0.
    """
    rules = rules or ScaleRules()
    for keep in (
        lambda u: u.part == _PROMPT and not u.selected and not u.excluded,
        lambda u: not u.selected and not u.excluded,
        lambda u: True,
    ):
        ref = reference_scale([u.score for u in display_units if keep(u)], rules)
        if ref > 0:
            return ref
    return 0.0


def heatmap(
    response: saliency_pb2.SaliencyResponse,
    method_index: int = 0,
    *,
    intensity: float = 1.0,
    use_segments: bool = True,
    rules: ScaleRules | None = None,
) -> Heatmap:
    """Units, normalised values and colours for one method (shared by every renderer)."""
    rules = rules or ScaleRules()
    us = units(response, method_index, use_segments, rules)
    method = _method_of(response, method_index)
    signed = colors.is_signed(method)
    scale = color_scale(us, rules)
    values = colors.normalize([u.score for u in us], intensity, signed=signed, scale=scale)
    values = [0.0 if u.excluded else v for u, v in zip(us, values, strict=True)]
    return Heatmap(
        units=us,
        values=values,
        colors=[
            colors.EXCLUDED_COLOR if u.excluded else colors.color_for(v, signed)
            for u, v in zip(us, values, strict=True)
        ],
        method=method,
        signed=signed,
        scale=scale,
        intensity=float(intensity),
        from_segments=use_segments and len(response.segments) > 0,
        rules=rules,
    )


def _pieces(unit: Unit, tokens: Sequence[common_pb2.Token]) -> list[tuple[str, bool]]:
    """The unit's text as ``(text, is_special)`` pieces.

    A segment mixing special and ordinary tokens (e.g. ``"<s>Hello"``) is split
    per token so the special token can be drawn (or left out) on its own.
    """
    if unit.special:
        return [(unit.text, True)]
    a, b = unit.token_start, unit.token_end
    if a >= 0 and b <= len(tokens) and b - a > 1:
        toks = [tokens[i] for i in range(a, b)]
        if any(t.special for t in toks) and "".join(t.text for t in toks) == unit.text:
            return [(t.text, bool(t.special)) for t in toks]
    return [(unit.text, False)]


# --------------------------------------------------------------------------- JSON


def response_to_json(response: saliency_pb2.SaliencyResponse) -> dict[str, Any]:
    """The response as a JSON-serialisable dict.

    Proto field names (``preserving_proto_field_name``); ``json_format.ParseDict`` reads it back.
    """
    return json_format.MessageToDict(response, preserving_proto_field_name=True)


def render_json(response: saliency_pb2.SaliencyResponse, *, indent: int | None = 2) -> str:
    """:func:`response_to_json` as a JSON string."""
    return json.dumps(response_to_json(response), indent=indent, ensure_ascii=False)


# --------------------------------------------------------------------------- HTML

_CSS = """
:root { color-scheme: light; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #111;
       background: #fff; margin: 1.5rem auto; max-width: 60rem; padding: 0 1rem; }
h1 { font-size: 1.25rem; margin: 0 0 .75rem; }
h2 { font-size: 1rem; margin: 1.25rem 0 .25rem; color: #444; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .1rem 1rem; margin: 0 0 1rem;
          font-size: .875rem; }
dl.meta dt { color: #555; }
dl.meta dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
             overflow-wrap: anywhere; }
.legend { font-size: .8rem; color: #333; margin: 0 0 1rem; }
.legend .bar { width: 18rem; height: .9rem; border: 1px solid #999; border-radius: 2px; }
.legend .ticks { width: 18rem; display: flex; justify-content: space-between;
                 font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.legend p { margin: .25rem 0 0; }
.seqsal-text { white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.9; font-size: 1rem;
               border: 1px solid #ddd; border-radius: 4px; padding: .75rem 1rem; }
.u { border-radius: 2px; }
.u.sel { outline: 2px solid #000; outline-offset: 0; }
.special { opacity: .55; font-size: .8em; }
.excl { background-image: repeating-linear-gradient(135deg, transparent 0 3px, rgba(0, 0, 0, .14) 3px 5px); }
.special::before { content: attr(data-text); }
.marker { opacity: .55; font-size: .8em; font-family: ui-monospace, Menlo, Consolas, monospace; }
.boundary { border-left: 2px solid #888; margin: 0 1px; }
.chips { line-height: 2.3; }
.chips .u { border: 1px solid rgba(0, 0, 0, .3); border-radius: 4px; padding: 1px 2px; margin: 0 1px;
            -webkit-box-decoration-break: clone; box-decoration-break: clone; }
.key .sel-key { outline: 2px solid #000; padding: 0 .2em; }
""".strip()


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _unit_html(unit: Unit, color: str, tokens: Sequence[common_pb2.Token]) -> str:
    classes = ["u", _PART_CLASS.get(unit.part, "p-other")]
    if unit.selected:
        classes.append("sel")
    if unit.excluded:
        classes.append("excl")
    if unit.marker:
        classes.append("marker")
    title = "score: " + colors.format_score(unit.score)
    if unit.excluded:
        title += " (left out of the colour range)"
    attrs = [f'title="{_esc(title)}"']
    attrs.append(f'style="background-color:{color};color:{colors.text_color_for(color)}"')
    if unit.special:
        # Drawn by CSS (::before), so the page's text content is exactly the original text.
        classes.append("special")
        attrs.append(f'data-text="{_esc(unit.text)}"')
        inner = ""
    else:
        inner = "".join(
            f'<span class="special" data-text="{_esc(text)}"></span>' if special else _esc(text)
            for text, special in _pieces(unit, tokens)
        )
    return f'<span class="{" ".join(classes)}" {" ".join(attrs)}>{inner}</span>'


def _text_block(
    hm: Heatmap, idx: Sequence[int], tokens: Sequence[common_pb2.Token], block_id: str, chips: bool
) -> str:
    spans: list[str] = []
    seen_prompt = False
    boundary_done = False
    for i in idx:
        u = hm.units[i]
        if u.part == _TARGET and seen_prompt and not boundary_done:
            spans.append('<span class="boundary" title="target starts here" aria-hidden="true"></span>')
            boundary_done = True
        seen_prompt = seen_prompt or u.part == _PROMPT
        spans.append(_unit_html(u, hm.colors[i], tokens))
    cls = "seqsal-text chips" if chips else "seqsal-text"
    # No whitespace between spans: the block is white-space: pre-wrap.
    return f'<div class="{cls}" id="{block_id}">{"".join(spans)}</div>'


def _reference_words(hm: Heatmap) -> str:
    p = hm.rules.clip_percentile
    where = "of |score| over prompt units"
    return f"max {where}" if p is None else f"{p:g}th percentile {where}"


def _rules_note(hm: Heatmap) -> str:
    """The scale rules in words, with the hatching named, when any unit or rule needs saying."""
    text = hm.rules.describe()
    return text.replace("marked ⊘", "hatched") if text else ""


def _legend_html(hm: Heatmap) -> str:
    stops = colors.legend_stops(hm.signed)
    lo, hi = stops[0][0], stops[-1][0]
    gradient = ", ".join(f"{c} {100.0 * (x - lo) / (hi - lo):.1f}%" for x, c in stops)
    sat = hm.saturation
    if hm.signed:
        ticks = [f"-{colors.format_score(sat)}", "0", f"+{colors.format_score(sat)}"]
        rng = f"-{colors.format_score(sat)} … +{colors.format_score(sat)}"
    else:
        ticks = ["0", colors.format_score(sat / 2), colors.format_score(sat)]
        rng = f"0 … {colors.format_score(sat)}"
    tick_html = "".join(f"<span>{_esc(t)}</span>" for t in ticks)
    note = (
        f"Colour range {rng} ({_reference_words(hm)} {colors.format_score(hm.scale)}"
        f" ÷ intensity {hm.intensity:g}); scores beyond it are clipped."
    )
    rules_note = _rules_note(hm)
    return (
        f'<div class="legend" id="seqsal-legend" data-min="{_esc(-sat if hm.signed else 0.0)}"'
        f' data-max="{_esc(sat)}">'
        f'<div class="bar" style="background:linear-gradient(to right, {gradient})"></div>'
        f'<div class="ticks">{tick_html}</div>'
        f"<p>{_esc(note)}</p>"
        f"{f'<p class=rules>{_esc(rules_note)}</p>' if rules_note else ''}"
        '<p class="key"><span class="sel-key">outlined</span> = explained target tokens;'
        " dimmed = special tokens; a grey bar marks where the target starts.</p>"
        "</div>"
    )


def _meta_rows(
    response: saliency_pb2.SaliencyResponse, hm: Heatmap, method_index: int
) -> list[tuple[str, str]]:
    n_target = sum(1 for t in response.tokens if t.part == _TARGET)
    n_selected = len(selected_token_indices(response))
    granularity = _granularity_name(response.granularity) if hm.from_segments else "TOKENS"
    rows = [
        ("model", response.model or "—"),
        ("revision", response.revision or "—"),
        ("method", f"{method_name(hm.method)} ({'signed' if hm.signed else 'non-negative'})"),
        ("granularity", granularity),
        ("target log-prob", f"{response.target_logprob:.4f}"),
    ]
    if response.HasField("foil_logprob"):
        rows.append(("foil log-prob", f"{response.foil_logprob:.4f}"))
    rows.append(("explained target tokens", f"{n_selected} of {n_target}"))
    if len(response.scores) > method_index:
        ms = response.scores[method_index]
        if ms.HasField("completeness_residual"):
            rows.append(("IG completeness residual", f"{ms.completeness_residual:.4g} ({ms.ig_steps} steps)"))
    rows.append(("dtype", response.dtype or "—"))
    rows.append(("device", response.device or "—"))
    rows.append(
        ("server time", f"{response.server_time_ms:.1f} ms" + (" (cache hit)" if response.cache_hit else ""))
    )
    return rows


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _data_json(hm: Heatmap) -> str:
    data = {
        "method": method_name(hm.method),
        "signed": hm.signed,
        "scale": _finite_or_none(hm.scale),
        "intensity": _finite_or_none(hm.intensity),
        "rules": {
            "include_sink": hm.rules.include_sink,
            "include_special": hm.rules.include_special,
            "clip_percentile": hm.rules.clip_percentile,
            "aggregate": hm.rules.aggregate,
        },
        "units": [
            {
                "part": _PART_LABEL.get(u.part, str(u.part)),
                "text": u.text,
                "score": _finite_or_none(u.score),
                "value": v,
                "color": c,
                "token_start": u.token_start,
                "token_end": u.token_end,
                "selected": u.selected,
                "special": u.special,
                "excluded": u.excluded,
            }
            for u, v, c in zip(hm.units, hm.values, hm.colors, strict=True)
        ],
    }
    # Safe inside <script>: no "<" (so no "</script" or "<!--"), ">" or "&" survives.
    return (
        json.dumps(data, ensure_ascii=False, allow_nan=False)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )


def render_html(
    response: saliency_pb2.SaliencyResponse,
    method_index: int = 0,
    *,
    intensity: float = 1.0,
    title: str = "seqsal saliency",
    chips: bool = False,
    use_segments: bool = True,
    include_data: bool = True,
    rules: ScaleRules | None = None,
) -> str:
    """A standalone HTML page (inline CSS, no scripts, no external resources).

    The prompt and target are drawn as running text (``white-space: pre-wrap``)
    in ``<div id="seqsal-text">``, a foil (if any) in ``<div id="seqsal-foil">``;
    each unit is a ``<span>`` with its background colour and a
    ``title="score: …"`` tooltip; explained target units are outlined; special
    tokens are drawn dimmed through CSS only, so the block's text content is
    exactly the original text. ``chips=True`` draws each unit as a bordered box.
    ``rules`` (:class:`seqsal.scale.ScaleRules`) choose the colour range and segment scores.
    ``include_data`` embeds the units and scores as
    ``<script type="application/json" id="seqsal-data">`` (inert, escaped).
    """
    hm = heatmap(response, method_index, intensity=intensity, use_segments=use_segments, rules=rules)
    tokens = list(response.tokens)
    main_idx = [i for i, u in enumerate(hm.units) if u.part != _FOIL]
    foil_idx = [i for i, u in enumerate(hm.units) if u.part == _FOIL]
    meta = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in _meta_rows(response, hm, method_index))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{_esc(title)}</h1>",
        f'<dl class="meta">{meta}</dl>',
        _legend_html(hm),
        "<h2>Prompt → target</h2>",
        _text_block(hm, main_idx, tokens, "seqsal-text", chips),
    ]
    if foil_idx:
        parts += ["<h2>Foil</h2>", _text_block(hm, foil_idx, tokens, "seqsal-foil", chips)]
    if include_data:
        parts.append(f'<script type="application/json" id="seqsal-data">{_data_json(hm)}</script>')
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- terminal


def _control_table() -> dict[int, str]:
    table: dict[int, str] = {c: chr(0x2400 + c) for c in range(0x20) if c not in (0x09, 0x0A)}
    table[0x7F] = "\u2421"
    table.update({c: f"\\x{c:02x}" for c in range(0x80, 0xA0)})
    return table


_CONTROL_TABLE = _control_table()


def _terminal_safe(text: str) -> str:
    """Control characters (except tab and newline) as visible symbols: never emit escape sequences."""
    return text.translate(_CONTROL_TABLE)


def _cell_text(text: str) -> str:
    return _terminal_safe(
        text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    )


def _unit_style(unit: Unit, color: str, *, special: bool = False) -> Style:
    if unit.excluded:
        # Left out of the range: no colour (it would read as a score), italic instead.
        return Style(italic=True, dim=True, bold=unit.selected or None, underline=unit.selected or None)
    return Style(
        bgcolor=color,
        color=colors.text_color_for(color),
        bold=unit.selected or None,
        underline=unit.selected or None,
        dim=(unit.special or unit.marker or special) or None,
    )


def _legend_text(hm: Heatmap) -> Text:
    sat = hm.saturation
    n = 11 if hm.signed else 9
    lo = -1.0 if hm.signed else 0.0
    legend = Text()
    legend.append(f"{method_name(hm.method)}  ", style="bold")
    legend.append(f"-{colors.format_score(sat)} " if hm.signed else "0 ")
    for k in range(n):
        c = colors.color_for(lo + (1.0 - lo) * k / (n - 1), hm.signed)
        legend.append("  ", style=Style(bgcolor=c))
    legend.append(f" {'+' if hm.signed else ''}{colors.format_score(sat)}")
    legend.append(
        f"  ({_reference_words(hm)} {colors.format_score(hm.scale)} ÷ intensity {hm.intensity:g};"
        " underlined = explained target)",
        style="dim",
    )
    rules_note = hm.rules.describe().replace("marked ⊘, value on hover", "shown uncoloured, in italics")
    if rules_note:
        legend.append(f"  {rules_note}", style="dim")
    return legend


def render_terminal(
    response: saliency_pb2.SaliencyResponse,
    method_index: int = 0,
    *,
    intensity: float = 1.0,
    console: Console | None = None,
    use_segments: bool = True,
    show_special: bool = False,
    legend: bool = True,
    rules: ScaleRules | None = None,
) -> Text:
    """The prompt and target as running text with a background colour per unit.

    Explained target units are bold and underlined. Special tokens are left out
    unless ``show_special`` (then dimmed), so the text's ``plain`` is the
    original prompt + target (control characters other than tab/newline shown as
    symbols). A foil follows on a new line, then (``legend``) a legend line.
    When ``console`` is given the text is also printed to it.
    """
    hm = heatmap(response, method_index, intensity=intensity, use_segments=use_segments, rules=rules)
    tokens = list(response.tokens)
    out = Text()

    def add(indices: Sequence[int]) -> None:
        for i in indices:
            u, c = hm.units[i], hm.colors[i]
            for piece, special in _pieces(u, tokens):
                if special and not show_special:
                    continue
                out.append(_terminal_safe(piece), style=_unit_style(u, c, special=special))

    add([i for i, u in enumerate(hm.units) if u.part != _FOIL])
    foil_idx = [i for i, u in enumerate(hm.units) if u.part == _FOIL]
    if foil_idx:
        out.append("\nfoil: ", style="italic")
        add(foil_idx)
    if legend:
        out.append("\n")
        out.append_text(_legend_text(hm))
    if console is not None:
        console.print(out)
    return out


def render_table(
    response: saliency_pb2.SaliencyResponse,
    method_index: int = 0,
    *,
    top_k: int | None = None,
    intensity: float = 1.0,
    use_segments: bool = True,
    rules: ScaleRules | None = None,
) -> Table:
    """A table of the units and their scores, in text order, or the ``top_k`` by ``|score|``.

    Columns: unit index, part (``target*`` = explained), text (newlines, tabs and
    control characters escaped, background = heatmap colour) and score.
    """
    hm = heatmap(response, method_index, intensity=intensity, use_segments=use_segments, rules=rules)
    order = list(range(len(hm.units)))
    if top_k is not None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        order.sort(key=lambda i: (0.0 if math.isnan(hm.units[i].score) else -abs(hm.units[i].score), i))
        order = order[:top_k]
    title = f"{method_name(hm.method)} saliency" + (f" (top {top_k})" if top_k is not None else "")
    table = Table(
        title=title,
        caption=f"colour range ±{colors.format_score(hm.saturation)}"
        if hm.signed
        else f"colour range 0 … {colors.format_score(hm.saturation)}",
    )
    table.add_column("#", justify="right", style="dim")
    table.add_column("part")
    table.add_column("text")
    table.add_column("score", justify="right")
    for i in order:
        u, c = hm.units[i], hm.colors[i]
        part = _PART_LABEL.get(u.part, str(u.part)) + ("*" if u.selected else "")
        table.add_row(
            str(i),
            part,
            Text(_cell_text(u.text), style=_unit_style(u, c)),
            colors.format_score(u.score),
        )
    return table
