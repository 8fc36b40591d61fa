"""Tests for seqsal.colors and seqsal.render (hand-built SaliencyResponse protos, no model)."""

from __future__ import annotations

import html
import io
import itertools
import json
import math
import re
from collections.abc import Callable, Sequence

import pytest
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table
from rich.text import Text

from seqsal import colors, render
from seqsal.scale import ScaleRules
from seqsal.v1 import common_pb2, saliency_pb2

PROMPT = common_pb2.PROMPT
TARGET = common_pb2.TARGET
FOIL = common_pb2.FOIL

# ----------------------------------------------------------------------------- builders


def _tokens(pieces: Sequence[str], part: int, *, bos: str | None = None) -> list[common_pb2.Token]:
    out: list[common_pb2.Token] = []
    if bos is not None:
        out.append(common_pb2.Token(id=1, text=bos, start=0, end=0, special=True, part=part))
    pos = 0
    for k, piece in enumerate(pieces):
        out.append(common_pb2.Token(id=100 + k, text=piece, start=pos, end=pos + len(piece), part=part))
        pos += len(piece)
    return out


def make_response(
    prompt_pieces: Sequence[str],
    target_pieces: Sequence[str],
    method_scores: dict[int, Sequence[float]],
    *,
    mask: Sequence[bool] | None = None,
    bos: str | None = "<s>",
    foil_pieces: Sequence[str] = (),
) -> saliency_pb2.SaliencyResponse:
    tokens = (
        _tokens(prompt_pieces, PROMPT, bos=bos) + _tokens(target_pieces, TARGET) + _tokens(foil_pieces, FOIL)
    )
    n_target = len(target_pieces)
    resp = saliency_pb2.SaliencyResponse(
        tokens=tokens,
        scores=[saliency_pb2.MethodScores(method=m, scores=list(s)) for m, s in method_scores.items()],
        target_mask=list(mask) if mask is not None else [True] * n_target,
        target_logprob=-3.25,
        target_token_logprobs=[-1.0] * n_target,
        model="tiny-llama",
        revision="abc123",
        dtype="float32",
        device="cpu",
        server_time_ms=12.5,
    )
    for m, s in method_scores.items():
        assert len(s) == len(tokens), (m, len(s), len(tokens))
    return resp


PROMPT_PIECES = ["Hello", " world", ",\n", "  how", " are", " you", "?"]
TARGET_PIECES = [" Fine", ",", " thanks", "."]
PROMPT_TEXT = "".join(PROMPT_PIECES)
TARGET_TEXT = "".join(TARGET_PIECES)
# BOS + 7 prompt tokens + 4 target tokens = 12; values exactly representable in float32.
L2 = [8.0, 0.5, 1.0, 0.25, 2.0, 0.0, 0.75, 1.5, 0.5, 0.25, 0.0, 0.0]
DOT = [-4.0, -0.5, 1.0, -2.0, 0.25, 0.0, 0.5, -1.25, 0.5, -0.25, 0.0, 0.0]


def basic_response() -> saliency_pb2.SaliencyResponse:
    return make_response(
        PROMPT_PIECES,
        TARGET_PIECES,
        {common_pb2.GRAD_L2: L2, common_pb2.GRAD_DOT_INPUT: DOT},
        mask=[False, False, True, True],
    )


def segmented_response() -> saliency_pb2.SaliencyResponse:
    """basic_response with LINES-like segments: BOS alone, two prompt lines, the target."""
    resp = basic_response()
    toks = resp.tokens

    def seg(part: int, a: int, b: int) -> common_pb2.Segment:
        text = "".join(toks[i].text for i in range(a, b))
        nonspecial = [toks[i] for i in range(a, b) if not toks[i].special]
        c0 = nonspecial[0].start if nonspecial else 0
        c1 = nonspecial[-1].end if nonspecial else 0
        return common_pb2.Segment(
            part=part,
            token_start=a,
            token_end=b,
            char_start=c0,
            char_end=c1,
            text=text,
            scores=[sum(L2[a:b]), sum(DOT[a:b])],
        )

    resp.segments.extend([seg(PROMPT, 0, 1), seg(PROMPT, 1, 4), seg(PROMPT, 4, 8), seg(TARGET, 8, 12)])
    resp.granularity = common_pb2.LINES
    return resp


def main_block_html(page: str, block_id: str = "seqsal-text") -> str:
    m = re.search(rf'<div class="seqsal-text[^"]*" id="{block_id}">(.*?)</div>', page, re.S)
    assert m is not None, f"no #{block_id} block"
    return m.group(1)


def strip_tags(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]*>", "", fragment))


# ----------------------------------------------------------------------------- colors


def test_is_signed() -> None:
    assert not colors.is_signed(common_pb2.GRAD_L2)
    assert colors.is_signed(common_pb2.GRAD_DOT_INPUT)
    assert colors.is_signed(common_pb2.INTEGRATED_GRADIENTS)
    assert not colors.is_signed(common_pb2.METHOD_UNSPECIFIED)


def test_sequential_colors_ends_and_middle() -> None:
    assert colors.color_for(0.0, False) == "#ffffff"
    assert colors.color_for(1.0, False) == "#3f007d"
    assert colors.color_for(0.5, False) == "#9e9ac8"  # a stop
    # Halfway between the 0.5 stop (#9e9ac8) and the 0.75 stop (#6a51a3).
    assert colors.color_for(0.625, False) == "#8476b6"
    # Clipping, negatives and NaN.
    assert colors.color_for(7.0, False) == "#3f007d"
    assert colors.color_for(-0.5, False) == "#ffffff"
    assert colors.color_for(math.nan, False) == "#ffffff"


def test_diverging_colors_ends_and_middle() -> None:
    assert colors.color_for(0.0, True) == "#ffffff"
    assert colors.color_for(-1.0, True) == "#2166ac"
    assert colors.color_for(1.0, True) == "#b2182b"
    assert colors.color_for(-3.0, True) == "#2166ac"
    assert colors.color_for(3.0, True) == "#b2182b"
    neg, pos = colors.color_for(-0.5, True), colors.color_for(0.5, True)
    nr, _, nb = (int(neg[i : i + 2], 16) for i in (1, 3, 5))
    pr, _, pb = (int(pos[i : i + 2], 16) for i in (1, 3, 5))
    assert nb > nr, "negative values are blue-ish"
    assert pr > pb, "positive values are red-ish"


def test_colors_darken_with_value() -> None:
    def lum(c: str) -> float:
        return sum(int(c[i : i + 2], 16) for i in (1, 3, 5))

    seq = [lum(colors.color_for(k / 20, False)) for k in range(21)]
    assert all(a >= b for a, b in itertools.pairwise(seq))
    pos = [lum(colors.color_for(k / 20, True)) for k in range(21)]
    neg = [lum(colors.color_for(-k / 20, True)) for k in range(21)]
    assert all(a >= b for a, b in itertools.pairwise(pos))
    assert all(a >= b for a, b in itertools.pairwise(neg))


def test_text_color_for_contrast() -> None:
    assert colors.text_color_for("#ffffff") == "#000000"
    assert colors.text_color_for("#fff") == "#000000"
    assert colors.text_color_for("#3f007d") == "#ffffff"
    assert colors.text_color_for("#2166ac") == "#ffffff"
    assert colors.text_color_for("#fddbc7") == "#000000"
    with pytest.raises(ValueError):
        colors.text_color_for("purple")


def test_legend_stops() -> None:
    seq = colors.legend_stops(False)
    div = colors.legend_stops(True)
    assert seq[0] == (0.0, "#ffffff") and seq[-1] == (1.0, "#3f007d")
    assert div[0] == (-1.0, "#2166ac") and div[-1] == (1.0, "#b2182b")
    assert (0.0, "#ffffff") in div
    for stops in (seq, div):
        xs = [x for x, _ in stops]
        assert xs == sorted(xs)
        assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for _, c in stops)
        assert all(colors.color_for(x, stops is div) == c for x, c in stops)


def test_normalize_signed_and_unsigned() -> None:
    assert colors.normalize([-2.0, 1.0, 0.0], signed=True) == [-1.0, 0.5, 0.0]
    assert colors.normalize([0.0, 2.0, 4.0], signed=False) == [0.0, 0.5, 1.0]
    # Unsigned clips negatives to 0 (but they still count for the scale).
    assert colors.normalize([-4.0, 2.0], signed=False) == [0.0, 0.5]
    # Explicit reference scale; values beyond it clip.
    assert colors.normalize([1.0, -3.0, 6.0], signed=True, scale=2.0) == [0.5, -1.0, 1.0]


def test_normalize_intensity_clips() -> None:
    assert colors.normalize([0.0, 1.0, 2.0, 4.0], 2.0, signed=False) == [0.0, 0.5, 1.0, 1.0]
    assert colors.normalize([-4.0, -1.0, 2.0], 2.0, signed=True) == [-1.0, -0.5, 1.0]
    assert colors.normalize([4.0, 2.0], 0.5, signed=False) == [0.5, 0.25]
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            colors.normalize([1.0], bad, signed=False)


def test_normalize_degenerate() -> None:
    assert colors.normalize([0.0, 0.0, 0.0], signed=True) == [0.0, 0.0, 0.0]
    assert colors.normalize([0.0, 0.0], 3.0, signed=False) == [0.0, 0.0]
    assert colors.normalize([], signed=True) == []
    assert colors.normalize([1.0, 2.0], signed=True, scale=0.0) == [0.0, 0.0]
    assert colors.normalize([math.nan, 2.0, math.inf], signed=True) == [0.0, 1.0, 1.0]
    assert colors.max_abs([math.nan, -3.0, math.inf]) == 3.0


def test_format_score() -> None:
    assert colors.format_score(0.12344) == "0.1234"
    assert colors.format_score(-0.0) == "0.0000"
    assert colors.format_score(2.5e-5) == "2.500e-05"


# ----------------------------------------------------------------------------- units


def test_units_from_tokens() -> None:
    resp = basic_response()
    us = render.units(resp)
    assert len(us) == len(resp.tokens) == 12
    assert [u.text for u in us] == ["<s>", *PROMPT_PIECES, *TARGET_PIECES]
    assert [u.score for u in us] == L2
    assert [u.part for u in us] == [PROMPT] * 8 + [TARGET] * 4
    assert [u.special for u in us] == [True] + [False] * 11
    assert [u.selected for u in us] == [False] * 10 + [True, True]
    assert [(u.token_start, u.token_end) for u in us] == [(i, i + 1) for i in range(12)]
    assert [u.score for u in render.units(resp, 1)] == DOT
    with pytest.raises(IndexError):
        render.units(resp, 2)


def test_units_from_segments() -> None:
    resp = segmented_response()
    us = render.units(resp)
    assert [u.text for u in us] == ["<s>", "Hello world,\n", "  how are you?", TARGET_TEXT]
    assert [(u.token_start, u.token_end) for u in us] == [(0, 1), (1, 4), (4, 8), (8, 12)]
    assert [u.score for u in us] == [8.0, 1.75, 4.25, 0.75]
    assert [u.score for u in render.units(resp, 1)] == [-4.0, -1.5, -0.5, 0.25]
    assert [u.special for u in us] == [True, False, False, False]
    assert [u.selected for u in us] == [False, False, False, True]
    # use_segments=False falls back to tokens.
    assert len(render.units(resp, use_segments=False)) == 12


def test_segment_score_falls_back_to_token_sum() -> None:
    resp = segmented_response()
    for seg in resp.segments:
        del seg.scores[:]
    assert [u.score for u in render.units(resp)] == [8.0, 1.75, 4.25, 0.75]


def test_empty_target_mask_selects_every_target_token() -> None:
    resp = basic_response()
    del resp.target_mask[:]
    assert render.selected_token_indices(resp) == {8, 9, 10, 11}


def test_color_scale_excludes_special_and_selected_target() -> None:
    resp = make_response(
        ["a", "b"], ["c", "d"], {common_pb2.GRAD_L2: [100.0, 1.0, 2.0, 50.0, 0.0]}, mask=[False, True]
    )
    hm = render.heatmap(resp)
    assert hm.scale == 2.0
    # The BOS is left out of the range: neutral, not a saturated colour (seqsal.scale).
    assert hm.values == [0.0, 0.5, 1.0, 1.0, 0.0]
    assert hm.units[0].excluded and hm.colors[0] == colors.EXCLUDED_COLOR
    assert hm.colors[2] == "#3f007d" and hm.colors[4] == "#ffffff"
    assert render.heatmap(resp, intensity=2.0).values[:3] == [0.0, 1.0, 1.0]
    assert render.heatmap(resp, intensity=2.0).saturation == 1.0


def test_all_zero_scores_render() -> None:
    resp = make_response(["a", " b"], [" c"], {common_pb2.GRAD_DOT_INPUT: [0.0] * 4})
    hm = render.heatmap(resp)
    assert hm.scale == 0.0 and hm.values == [0.0] * 4
    assert hm.colors == [colors.EXCLUDED_COLOR, "#ffffff", "#ffffff", "#ffffff"]  # the BOS is left out
    assert strip_tags(main_block_html(render.render_html(resp))) == "a b c"
    assert render.render_terminal(resp, legend=False).plain == "a b c"


# ----------------------------------------------------------------------------- HTML


@pytest.mark.parametrize("chips", [False, True])
@pytest.mark.parametrize("factory", [basic_response, segmented_response])
def test_html_text_reconstructs_original(
    chips: bool, factory: Callable[[], saliency_pb2.SaliencyResponse]
) -> None:
    resp = factory()
    page = render.render_html(resp, chips=chips)
    assert page.startswith("<!DOCTYPE html>")
    block = main_block_html(page)
    assert strip_tags(block) == PROMPT_TEXT + TARGET_TEXT
    # Every unit's text appears, once per unit, in order.
    pos = 0
    for u in render.units(resp):
        if u.special:
            needle = f'data-text="{html.escape(u.text, quote=True)}"'
        else:
            needle = f">{html.escape(u.text, quote=True)}</span>"
        found = block.find(needle, pos)
        assert found >= 0, u.text
        pos = found + len(needle)


def test_html_standalone_and_metadata() -> None:
    resp = basic_response()
    page = render.render_html(resp, title="My run")
    assert "white-space: pre-wrap" in page
    assert "<title>My run</title>" in page
    for forbidden in ("<link", "src=", "http://", "https://", "@import", "<script>", "javascript:"):
        assert forbidden not in page
    for value in ("tiny-llama", "abc123", "GRAD_L2", "TOKENS", "-3.2500", "float32"):
        assert value in page
    assert "LINES" in render.render_html(segmented_response())
    assert "GRAD_DOT_INPUT" in render.render_html(resp, 1)


def test_html_hover_titles_and_colors() -> None:
    resp = basic_response()
    page = render.render_html(resp)
    block = main_block_html(page)
    spans = re.findall(
        r'<span class="u ([^"]*)" title="score: ([^"]*)" style="background-color:(#[0-9a-f]{6})', block
    )
    assert len(spans) == 12
    assert [float(s.split()[0]) for _, s, _ in spans] == L2
    hm = render.heatmap(resp)
    assert [c for _, _, c in spans] == hm.colors
    classes = [c.split() for c, _, _ in spans]
    assert ["sel" in c for c in classes] == [False] * 10 + [True, True]
    assert "special" in classes[0] and not any("special" in c for c in classes[1:])
    assert 'title="score: 2.0000"' in block


def test_html_legend_range() -> None:
    resp = basic_response()
    # Prompt scale (BOS and selected target left out) is 2.0; intensity 2 saturates at 1.0.
    page = render.render_html(resp, intensity=2.0)
    legend = re.search(r'<div class="legend" id="seqsal-legend" data-min="([^"]*)" data-max="([^"]*)"', page)
    assert legend is not None and float(legend.group(1)) == 0.0 and float(legend.group(2)) == 1.0
    assert "linear-gradient" in page and "#3f007d" in page
    signed = render.render_html(resp, 1)
    legend = re.search(r'data-min="([^"]*)" data-max="([^"]*)"', signed)
    assert legend is not None and float(legend.group(1)) == -2.0 and float(legend.group(2)) == 2.0
    assert "#2166ac" in signed and "#b2182b" in signed


def test_html_escapes_untrusted_text() -> None:
    evil = ["<script>alert(1)</script>", " <img src=x onerror=alert(1)>", " \"quoted\" & 'single'", "</div>"]
    target = [" <!--", " </script>"]
    resp = make_response(evil, target, {common_pb2.GRAD_L2: [0.5] * 7}, bos='<s onload="x">')
    resp.model = '<img src=x onerror=alert("m")>'
    page = render.render_html(resp, title="<script>t</script>")
    assert "<script>alert" not in page
    assert "<img" not in page
    assert "</script>\n" not in page.split('id="seqsal-data">', 1)[0]
    assert page.count("<script") == 1  # only the inert JSON data block
    assert page.count("</script>") == 1
    assert "<!--" not in page
    assert "<s " not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&quot;quoted&quot; &amp; &#x27;single&#x27;" in page
    assert strip_tags(main_block_html(page)) == "".join(evil) + "".join(target)
    # The embedded JSON has no "<" at all and still decodes to the original text.
    m = re.search(r'<script type="application/json" id="seqsal-data">(.*?)</script>', page, re.S)
    assert m is not None and "<" not in m.group(1)
    data = json.loads(m.group(1))
    assert [u["text"] for u in data["units"]] == ['<s onload="x">', *evil, *target]


def test_html_chips_mode_differs() -> None:
    resp = basic_response()
    plain, chips = render.render_html(resp), render.render_html(resp, chips=True)
    assert plain != chips
    assert 'class="seqsal-text chips"' in chips and 'class="seqsal-text chips"' not in plain
    assert strip_tags(main_block_html(chips)) == strip_tags(main_block_html(plain))


def test_html_embedded_data() -> None:
    page = render.render_html(basic_response(), include_data=True)
    m = re.search(r'<script type="application/json" id="seqsal-data">(.*?)</script>', page, re.S)
    assert m is not None
    data = json.loads(m.group(1))
    assert data["method"] == "GRAD_L2" and data["signed"] is False and data["scale"] == 2.0
    assert [u["score"] for u in data["units"]] == L2
    assert "seqsal-data" not in render.render_html(basic_response(), include_data=False)


def test_html_mixed_special_segment() -> None:
    """A segment that glues BOS to a word still renders BOS dimmed and outside the text content."""
    resp = basic_response()
    resp.segments.extend(
        [
            common_pb2.Segment(
                part=PROMPT, token_start=0, token_end=3, text="<s>Hello world", scores=[9.0, 0.0]
            ),
            common_pb2.Segment(
                part=PROMPT, token_start=3, token_end=8, text=",\n  how are you?", scores=[1.0, 0.0]
            ),
            common_pb2.Segment(part=TARGET, token_start=8, token_end=12, text=TARGET_TEXT, scores=[1.0, 0.0]),
        ]
    )
    # By default the BOS (the sink, a special token) is split off its segment and left out of its score.
    us = render.units(resp)
    assert [(u.text, u.special, u.excluded, u.index) for u in us] == [
        ("<s>", True, True, 0),
        ("Hello world", False, False, 0),
        (",\n  how are you?", False, False, 1),
        (TARGET_TEXT, False, False, 0),
    ]
    assert [u.score for u in us[:2]] == [8.0, 0.5 + 1.0]
    page = render.render_html(resp)
    block = main_block_html(page)
    assert 'data-text="&lt;s&gt;"></span><span class="u p-prompt"' in block
    assert strip_tags(block) == PROMPT_TEXT + TARGET_TEXT
    # Counting every token, the segment stays whole with the server's score and the BOS drawn dimmed.
    every = ScaleRules(include_sink=True, include_special=True)
    us = render.units(resp, rules=every)
    assert [u.special for u in us] == [False, False, False] and us[0].score == 9.0
    page = render.render_html(resp, rules=every)
    block = main_block_html(page)
    assert '<span class="special" data-text="&lt;s&gt;"></span>Hello world' in block
    assert strip_tags(block) == PROMPT_TEXT + TARGET_TEXT
    assert render.render_terminal(resp, legend=False).plain == PROMPT_TEXT + TARGET_TEXT
    assert (
        render.render_terminal(resp, legend=False, show_special=True).plain
        == "<s>" + PROMPT_TEXT + TARGET_TEXT
    )


def test_html_foil_block() -> None:
    resp = make_response(["Q:"], [" yes"], {common_pb2.GRAD_L2: [0.0, 1.0, 0.0, 0.0]}, foil_pieces=[" no"])
    resp.foil_logprob = -2.0
    page = render.render_html(resp)
    assert strip_tags(main_block_html(page)) == "Q: yes"
    assert strip_tags(main_block_html(page, "seqsal-foil")) == " no"
    assert "foil log-prob" in page and "-2.0000" in page


# ----------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("factory", [basic_response, segmented_response])
def test_json_round_trip(factory: Callable[[], saliency_pb2.SaliencyResponse]) -> None:
    resp = factory()
    resp.foil_logprob = -1.5
    resp.scores[0].completeness_residual = 0.125
    d = render.response_to_json(resp)
    assert "target_mask" in d and "tokens" in d  # proto field names, not camelCase
    assert json_format.ParseDict(d, saliency_pb2.SaliencyResponse()) == resp
    text = render.render_json(resp)
    assert json_format.ParseDict(json.loads(text), saliency_pb2.SaliencyResponse()) == resp
    assert json.loads(render.render_json(resp, indent=None)) == d


# ----------------------------------------------------------------------------- terminal


def _body(text: Text) -> Text:
    """The running-text part of a render_terminal result (before the legend line)."""
    return text[: text.plain.rindex("\n")]


def test_terminal_plain_text_is_original() -> None:
    for resp in (basic_response(), segmented_response()):
        out = render.render_terminal(resp)
        assert isinstance(out, Text)
        assert out.plain.startswith(PROMPT_TEXT + TARGET_TEXT + "\n")
        assert "GRAD_L2" in out.plain.rsplit("\n", 1)[1]
        assert render.render_terminal(resp, legend=False).plain == PROMPT_TEXT + TARGET_TEXT
    assert render.render_terminal(basic_response(), show_special=True, legend=False).plain == (
        "<s>" + PROMPT_TEXT + TARGET_TEXT
    )


def test_terminal_styles() -> None:
    resp = basic_response()
    out = render.render_terminal(resp, legend=False)
    hm = render.heatmap(resp)
    # One span per shown unit (BOS hidden), with the heatmap colour and selection style.
    styled = [(out.plain[s.start : s.end], s.style) for s in out.spans]
    assert [t for t, _ in styled] == PROMPT_PIECES + TARGET_PIECES
    for (_, style), color, unit in zip(styled, hm.colors[1:], hm.units[1:], strict=True):
        assert not isinstance(style, str)
        assert style.bgcolor is not None and style.bgcolor.triplet is not None
        assert style.bgcolor.triplet.hex == color
        assert bool(style.underline) == unit.selected and bool(style.bold) == unit.selected


def test_terminal_neutralises_control_characters() -> None:
    resp = make_response(["a\x1b[2J", "\tb\n"], ["\x07c\x9b"], {common_pb2.GRAD_L2: [0.0, 1.0, 1.0, 1.0]})
    out = render.render_terminal(resp, legend=False)
    assert "\x1b" not in out.plain and "\x07" not in out.plain and "\x9b" not in out.plain
    assert out.plain == "a\u241b[2J\tb\n\u2407c\\x9b"
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, color_system="truecolor", width=80)
    render.render_terminal(resp, console=console)
    assert "\x1b[2J" not in buf.getvalue() and "\x07" not in buf.getvalue()
    assert "GRAD_L2" in buf.getvalue()


def test_render_table() -> None:
    resp = basic_response()
    table = render.render_table(resp)
    assert isinstance(table, Table)
    assert table.row_count == 12
    top = render.render_table(resp, 1, top_k=3)
    assert top.row_count == 3
    buf = io.StringIO()
    Console(file=buf, width=100, color_system=None).print(top)
    out = buf.getvalue()
    # Top |score| for GRAD_DOT_INPUT: BOS (-4.0), ",\n" (-2.0), "?" (-1.25).
    assert "-4.0000" in out and "-2.0000" in out and "-1.2500" in out
    assert out.index("-4.0000") < out.index("-2.0000") < out.index("-1.2500")
    assert "target*" not in out
    buf = io.StringIO()
    Console(file=buf, width=100, color_system=None).print(table)
    assert "target*" in buf.getvalue() and ",\\n" in buf.getvalue()
    with pytest.raises(ValueError):
        render.render_table(resp, top_k=-1)
