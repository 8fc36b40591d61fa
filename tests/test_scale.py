"""The colour-scale rules (seqsal.scale) and that the UI, the HTML export and the CLI draw the same."""

from __future__ import annotations

import re

import pytest
from rich.text import Text

from seqsal import colors, render
from seqsal.scale import ScaleRules, aggregate, excluded_tokens, reference_scale, shared_scale
from seqsal.v1 import common_pb2, saliency_pb2
from ui.heatmap import build_payload
from ui.heatmap.payload import unit_rows

PROMPT, TARGET = common_pb2.PROMPT, common_pb2.TARGET


def _response(
    pieces: list[tuple[str, int, bool, float]], segments: list[tuple[int, int, int]] = ()
) -> saliency_pb2.SaliencyResponse:
    """Tokens ``(text, part, special, GRAD_L2 score)``; segments ``(part, token_start, token_end)``."""
    tokens, pos = [], 0
    for text, part, special, _ in pieces:
        tokens.append(
            common_pb2.Token(
                id=len(tokens), text=text, start=pos, end=pos + len(text), special=special, part=part
            )
        )
        pos += len(text)
    scores = [s for *_, s in pieces]
    n_target = sum(1 for _, part, *_ in pieces if part == TARGET)
    response = saliency_pb2.SaliencyResponse(
        tokens=tokens,
        scores=[saliency_pb2.MethodScores(method=common_pb2.GRAD_L2, scores=scores)],
        target_mask=[True] * n_target,
        granularity=common_pb2.SENTENCES if segments else common_pb2.TOKENS,
    )
    for part, a, b in segments:
        response.segments.append(
            common_pb2.Segment(
                part=part,
                token_start=a,
                token_end=b,
                text="".join(p[0] for p in pieces[a:b]),
                scores=[sum(scores[a:b])],
            )
        )
    return response


def _restaurant_like() -> saliency_pb2.SaliencyResponse:
    """The shape of the workbench's restaurant case: the first token soaks up gradient (a sink)."""
    pieces = [
        ("Analyze", PROMPT, False, 4.77),
        (" a menu item.", PROMPT, False, 2.0),
        (" Taste-likes: cheese.", PROMPT, False, 3.0),
        (" Recommendation:", PROMPT, False, 3.53),
        (" Likely good.", PROMPT, False, 2.5),
        (" Tasty", TARGET, False, 0.0),
    ]
    return _response(pieces, [(PROMPT, 0, 2), (PROMPT, 2, 3), (PROMPT, 3, 5), (TARGET, 5, 6)])


def test_sink_and_special_tokens_are_left_out_by_default() -> None:
    special = [True, False, False, True, False]
    assert excluded_tokens(special, ScaleRules()) == [True, False, False, True, False]
    assert excluded_tokens([False, False, True], ScaleRules()) == [True, False, True]  # no BOS: first token
    assert excluded_tokens(special, ScaleRules(include_sink=True)) == special
    assert excluded_tokens(special, ScaleRules(include_special=True)) == [True, False, False, False, False]
    assert excluded_tokens(special, ScaleRules(include_sink=True, include_special=True)) == [False] * 5
    assert excluded_tokens([], ScaleRules()) == []


def test_percentile_and_mean_give_the_documented_values() -> None:
    scores = [1.0, -2.0, 3.0, 4.0, 100.0, float("nan")]
    assert reference_scale(scores, ScaleRules()) == 100.0
    # numpy's linear interpolation over |score| of the finite values [1, 2, 3, 4, 100]
    assert reference_scale(scores, ScaleRules(clip_percentile=50)) == 3.0
    assert reference_scale(scores, ScaleRules(clip_percentile=75)) == 4.0
    assert reference_scale(scores, ScaleRules(clip_percentile=99)) == pytest.approx(4 + 0.96 * 96)
    assert reference_scale([], ScaleRules()) == 0.0
    assert aggregate([2.0, 4.0], ScaleRules()) == 6.0
    assert aggregate([2.0, 4.0], ScaleRules(aggregate="mean")) == 3.0
    assert aggregate([], ScaleRules(aggregate="mean")) == 0.0
    with pytest.raises(ValueError, match="clip_percentile"):
        ScaleRules(clip_percentile=0)
    with pytest.raises(ValueError, match="aggregate"):
        ScaleRules(aggregate="max")  # type: ignore[arg-type]


def test_sink_is_split_off_its_segment_and_the_ranking_changes() -> None:
    response = _restaurant_like()
    every = render.units(response, rules=ScaleRules(include_sink=True, include_special=True))
    assert every[0].text == "Analyze a menu item."
    top = max((u for u in every if u.part == PROMPT), key=lambda u: u.score)
    assert top.text == "Analyze a menu item."  # 6.77: the sink makes the instruction the darkest

    default = render.units(response)
    assert [(u.text, u.excluded, u.index) for u in default if u.part == PROMPT] == [
        ("Analyze", True, 0),
        (" a menu item.", False, 0),
        (" Taste-likes: cheese.", False, 1),
        (" Recommendation: Likely good.", False, 2),
    ]
    counted = [u for u in default if u.part == PROMPT and not u.excluded]
    assert max(counted, key=lambda u: u.score).text == " Recommendation: Likely good."
    hm = render.heatmap(response)
    assert hm.scale == pytest.approx(6.03)  # the sink's 4.77 no longer sets the range
    assert hm.colors[0] == colors.EXCLUDED_COLOR

    mean = render.units(response, rules=ScaleRules(aggregate="mean"))
    assert [u.score for u in mean if u.part == PROMPT] == pytest.approx([4.77, 2.0, 3.0, (3.53 + 2.5) / 2])


def _html_colors(page: str) -> list[str]:
    return re.findall(r'style="background-color:(#[0-9a-f]{6})', page.split('id="seqsal-text"', 1)[1])


def _terminal_colors(text: Text, n: int) -> list[str | None]:
    found = []
    for span in text.spans[:n]:
        bg = span.style.bgcolor if not isinstance(span.style, str) else None
        found.append(None if bg is None else bg.get_truecolor().hex)
    return found


@pytest.mark.parametrize(
    "rules",
    [
        ScaleRules(),
        ScaleRules(include_sink=True, include_special=True),
        ScaleRules(clip_percentile=75),
        ScaleRules(aggregate="mean"),
    ],
    ids=["default", "all", "p75", "mean"],
)
@pytest.mark.parametrize("segments", [False, True], ids=["tokens", "segments"])
def test_ui_html_and_cli_agree_on_every_colour(rules: ScaleRules, segments: bool) -> None:
    response = _restaurant_like()
    if not segments:
        del response.segments[:]
    hm = render.heatmap(response, rules=rules, intensity=1.5)
    payload = build_payload(response, 0, side="main", rules=rules, intensity=1.5)
    rows = unit_rows(payload)
    assert [r["color"] for r in rows] == hm.colors
    assert [r["excluded"] for r in rows] == [u.excluded for u in hm.units]
    assert _html_colors(render.render_html(response, rules=rules, intensity=1.5)) == hm.colors
    terminal = render.render_terminal(response, rules=rules, intensity=1.5, show_special=True)
    expected = [None if u.excluded else c for u, c in zip(hm.units, hm.colors, strict=True)]
    assert _terminal_colors(terminal, len(hm.units)) == expected
    assert payload["legend"]["rules"] == rules.describe()
    if rules.is_default:
        assert "first token" in payload["legend"]["rules"]
        assert "hatched" in render.render_html(response, rules=rules)


def test_a_shared_range_is_the_larger_of_the_sides_ranges() -> None:
    """Side-by-side: with ``fixed_scale`` both heatmaps end their range at the same |score|."""
    small, large = _restaurant_like(), _restaurant_like()
    for ms in large.scores:
        ms.scores[:] = [10 * s for s in ms.scores]
    for segment in large.segments:
        segment.scores[:] = [10 * s for s in segment.scores]
    own = [render.heatmap(r, rules=ScaleRules()).scale for r in (small, large)]
    assert own[1] == pytest.approx(10 * own[0])
    scale = shared_scale(own)
    assert scale == pytest.approx(own[1]) and shared_scale([0.0, float("nan")]) is None
    rules = ScaleRules(fixed_scale=scale)
    drawn = [render.heatmap(r, rules=rules) for r in (small, large)]
    assert [hm.scale for hm in drawn] == [scale, scale]
    # the small side is drawn ten times paler than on its own range: its top unit is at 0.1
    assert max(drawn[0].values) == pytest.approx(0.1, rel=1e-6) and max(drawn[1].values) == pytest.approx(1.0)
    assert "shared by both sides" in rules.describe()
    with pytest.raises(ValueError, match="fixed_scale"):
        ScaleRules(fixed_scale=0.0)


def _templated() -> saliency_pb2.SaliencyResponse:
    """A chat-templated prompt whose built-in system prompt soaks up gradient."""
    pieces = [
        ("<|im_start|>", PROMPT, False, 1.0),
        ("system\nYou are Qwen.", PROMPT, False, 9.0),
        ("<|im_end|>", PROMPT, False, 8.0),
        ("\n<|im_start|>user\n", PROMPT, False, 1.0),
        ("Is it good?", PROMPT, False, 2.0),
        ("<|im_end|>", PROMPT, False, 7.0),
        (" Yes", TARGET, False, 0.0),
    ]
    return _response(pieces)


def test_chat_template_markers_count_as_special_and_the_template_can_be_left_out() -> None:
    response = _templated()
    default = render.heatmap(response)
    marked = [u.text for u in default.units if u.marker]
    assert marked == ["<|im_start|>", "<|im_end|>", "\n<|im_start|>user\n", "<|im_end|>"]
    assert all(u.excluded for u in default.units if u.marker)  # special: out of the range by default
    assert default.scale == 9.0  # ... so the built-in system prompt sets it
    rules = ScaleRules(include_template=False, user_text="Is it good?")
    hm = render.heatmap(response, rules=rules)
    assert [u.text for u in hm.units if u.part == PROMPT and not u.excluded] == ["Is it good?"]
    assert hm.scale == 2.0 and "chat template" in rules.describe()
    # The UI, the HTML export and the CLI apply the same rule.
    assert [r["color"] for r in unit_rows(build_payload(response, 0, side="main", rules=rules))] == hm.colors
    assert [r["marker"] for r in unit_rows(build_payload(response, 0, side="main"))] == [
        u.marker for u in default.units
    ]
    assert _html_colors(render.render_html(response, rules=rules)) == hm.colors
    terminal = render.render_terminal(response, rules=rules, show_special=True)
    expected = [None if u.excluded else c for u, c in zip(hm.units, hm.colors, strict=True)]
    assert _terminal_colors(terminal, len(hm.units)) == expected
