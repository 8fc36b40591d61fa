"""The heatmap's data (payload), the exports' escaping, and the component's JavaScript safety rules."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from seqsal import colors
from seqsal.segmentation import segment_tokens, with_scores
from seqsal.v1 import common_pb2, saliency_pb2
from ui.export import file_stem, html_export, json_export
from ui.heatmap import build_payload, unit_rows

HEATMAP_DIR = Path(__file__).resolve().parent.parent / "ui" / "heatmap"
XSS_PROMPT = 'Review: <script>alert("x")</script>\n<img src=x onerror=alert(1)> & "quotes"\n'
XSS_TARGET = " <b>bold</b> answer."


def make_response(
    prompt: str = XSS_PROMPT,
    target: str = XSS_TARGET,
    *,
    granularity: int = common_pb2.WORDS,
    mask: list[bool] | None = None,
    method: int = common_pb2.GRAD_L2,
) -> saliency_pb2.SaliencyResponse:
    """A response as a server sends it: a BOS, prompt and target tokens (by char), scores, segments."""
    tokens = [common_pb2.Token(id=1, text="<s>", start=0, end=0, special=True, part=common_pb2.PROMPT)]
    for part, text in ((common_pb2.PROMPT, prompt), (common_pb2.TARGET, target)):
        pieces = re.findall(r"\s*\S+|\s+", text)
        pos = 0
        for piece in pieces:
            tokens.append(common_pb2.Token(id=5, text=piece, start=pos, end=pos + len(piece), part=part))
            pos += len(piece)
    sign = -1.0 if method != common_pb2.GRAD_L2 else 1.0
    scores = [0.5] + [((i % 5) + 1) * 0.1 * (sign if i % 2 else 1.0) for i in range(1, len(tokens))]
    n_target = sum(t.part == common_pb2.TARGET for t in tokens)
    response = saliency_pb2.SaliencyResponse(
        tokens=tokens,
        scores=[saliency_pb2.MethodScores(method=method, scores=scores)],
        granularity=granularity,
        target_mask=mask or [],
        model="tiny",
        dtype="float32",
        device="cpu",
    )
    assert len(response.target_mask) in (0, n_target)
    segments = segment_tokens(list(response.tokens), granularity)
    response.segments.extend(with_scores(segments, [scores]))
    return response


def test_payload_units_cover_the_text_in_order() -> None:
    payload = build_payload(make_response(), 0, side="main")
    rows = unit_rows(payload)
    assert "".join(r["text"] for r in rows if r["part"] == "prompt" and not r["special"]) == XSS_PROMPT
    assert "".join(r["text"] for r in rows if r["part"] == "target") == XSS_TARGET
    assert rows[0] == {**rows[0], "special": True, "text": "<s>", "index": 0}
    targets = [r for r in rows if r["part"] == "target"]
    assert [r["index"] for r in targets] == list(range(len(targets))) == list(range(payload["target_count"]))
    assert all(re.fullmatch(r"#[0-9a-f]{6}", r["color"]) and r["fg"] in ("#000000", "#ffffff") for r in rows)
    assert payload["whole_target"] and payload["selected"] == []
    json.dumps(payload, allow_nan=False)  # plain JSON


def test_payload_scale_colors_and_selection() -> None:
    mask = [False, True]
    response = make_response(mask=mask)
    payload = build_payload(
        response, 0, side="pin", selection=(1, 7), intensity=2.0, chips=True, compact=True
    )
    assert payload["selected"] == [1] and not payload["whole_target"]  # out-of-range indices dropped
    assert payload["chips"] and payload["compact"] and payload["side"] == "pin"
    legend = payload["legend"]
    assert legend["method"] == "GRAD_L2" and not legend["signed"] and legend["min"] == 0.0
    prompt_scores = [r["score"] for r in unit_rows(payload) if r["part"] == "prompt" and not r["special"]]
    assert legend["max"] == pytest.approx(max(prompt_scores) / 2)
    for row in unit_rows(payload):
        value = min(1.0, max(0.0, row["score"] / legend["max"]))
        expected = colors.EXCLUDED_COLOR if row["excluded"] else colors.color_for(value, False)
        assert row["color"] == expected
    assert unit_rows(payload)[0]["excluded"]  # the BOS: special and the sink position

    signed = build_payload(make_response(method=common_pb2.GRAD_DOT_INPUT), 0, side="main")
    assert signed["legend"]["signed"] and signed["legend"]["min"] == -signed["legend"]["max"]
    assert signed["legend"]["stops"][0] == [-1.0, "#2166ac"]


def test_payload_with_nan_scores_stays_valid_json() -> None:
    response = make_response()
    response.segments[3].scores[0] = float("nan")
    payload = build_payload(response, 0, side="main")
    assert unit_rows(payload)[3]["score"] is None
    json.dumps(payload, allow_nan=False)


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[str] = []
        self.scripts: list[tuple[str, ...]] = []
        self.text: list[str] = []
        self._depth = 0  # inside <div id="seqsal-text">

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]
        if tag == "script":
            self.scripts.append(tuple(f"{k}={v}" for k, v in attrs))
        if self._depth or ("id", "seqsal-text") in attrs:
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if self._depth:
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._depth:
            self.text.append(data)


def test_html_export_escapes_untrusted_text() -> None:
    page = html_export(make_response(), 0, title='Title <script>alert("t")</script>')
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;img" in page and "onerror=alert(1)&gt;" in page
    parsed = _Collector()
    parsed.feed(page)
    assert "img" not in parsed.tags and "b" not in parsed.tags
    assert not [a for a in parsed.attrs if a.startswith("on")]
    assert parsed.scripts == [("type=application/json", "id=seqsal-data")]  # inert data only
    assert "".join(parsed.text) == XSS_PROMPT + XSS_TARGET  # shown as text, exactly


def test_json_export_carries_the_view_and_the_response() -> None:
    doc = json.loads(
        json_export(
            make_response(), view={"ex": "x", "sel": "1"}, link="http://h/?ex=x", generation={"model": "m"}
        )
    )
    assert doc["view"] == {"ex": "x", "sel": "1"} and doc["link"] == "http://h/?ex=x"
    assert doc["generation"] == {"model": "m"}
    assert doc["saliency"]["model"] == "tiny"
    assert "".join(t["text"] for t in doc["saliency"]["tokens"][1:]) == XSS_PROMPT + XSS_TARGET


def test_file_stem() -> None:
    assert file_stem("Restaurant few-shot: copy/paste <error>") == "Restaurant-few-shot-copy-paste-error"
    assert file_stem("../..") == "seqsal"


def test_component_builds_the_view_with_text_nodes_only() -> None:
    js = (HEATMAP_DIR / "heatmap.js").read_text(encoding="utf-8")
    code = "\n".join(line for line in js.splitlines() if not line.lstrip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in code, sink
    assert "textContent" in code and "createDocumentFragment" in code
    # The hooks the browser test relies on.
    for hook in ('"seqsal-heatmap"', '"seqsal-unit"', '"data-part"', '"data-index"', '"data-score"'):
        assert hook in code, hook
    assert "seqsal-selected" in code and "seqsal-chips" in code
    css = (HEATMAP_DIR / "heatmap.css").read_text(encoding="utf-8")
    assert "white-space: pre-wrap" in css
