"""Pre-loaded examples: the bundled JSONL, validation with clear messages, uploads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seqsal.segmentation import segment_tokens
from ui.examples import EXAMPLES_PATH, decode_upload, load_examples, parse_jsonl, side_for_example
from ui.state import SideState


def test_bundled_examples_load_cleanly() -> None:
    examples, problems = load_examples()
    assert problems == []
    by_id = {e.id: e for e in examples}
    assert set(by_id) == {
        "restaurant-copy-paste",
        "restaurant-fixed",
        "restaurant-principles",
        "quiche-query",
        "gsm8k-socratic-annotated",
        "gsm8k-socratic-plain",
    }
    broken, fixed = by_id["restaurant-copy-paste"], by_id["restaurant-fixed"]
    # The copy-paste error: onion soup recommended to someone who does not like onions.
    assert "onions in it, which you don't like.\nRecommendation: You have to try it." in broken.prompt
    assert "onions in it, which you don't like.\nRecommendation: Not recommended." in fixed.prompt
    assert broken.prompt.endswith("Suggestion: Quiche Lorraine\nAnalysis:")
    assert "Recommendation:" in broken.target and broken.foil and broken.granularity == "SENTENCES"
    principles = by_id["restaurant-principles"].prompt
    assert "* The analysis should be brief and to the point." in principles
    assert "suitability for someone with a specified dietary restriction" in principles
    annotated, plain = by_id["gsm8k-socratic-annotated"], by_id["gsm8k-socratic-plain"]
    assert "<<36/2=18>>" in annotated.prompt and "<<" not in plain.prompt + plain.target
    assert " ** " in annotated.prompt and annotated.target.endswith("#### 31")
    assert annotated.prompt.replace("<<36/2=18>>", "").startswith(plain.prompt[:120])


def test_bundled_file_is_one_object_per_line() -> None:
    lines = [line for line in EXAMPLES_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert all(isinstance(json.loads(line), dict) for line in lines)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"id": "a", "title": "t"}', 'missing required field "prompt"'),
        ('{"id": "a", "title": "t", "prompt": ""}', '"prompt" is empty'),
        ('{"id": "a b", "title": "t", "prompt": "p"}', "\"id\" 'a b' must be"),
        ('{"id": "a", "title": "t", "prompt": 3}', '"prompt" must be a string, got int'),
        ('{"id": "a", "title": "t", "prompt": "p", "targt": "x"}', "unknown field(s) 'targt'"),
        ('{"id": "a", "title": "t", "prompt": "p", "granularity": "chapters"}', "unknown granularity"),
        (
            '{"id": "a", "title": "t", "prompt": "p", "granularity": "custom_regex", "regex": "("}',
            "not a valid",
        ),
        ('{"id": "a", "title": "t", "prompt": "p", "stop": "\\n"}', '"stop" must be a list'),
        ('{"id": "a", "title": "t", "prompt": "p", "chat_template": "yes"}', '"chat_template" must be true'),
        ('{"id": "a", "title": "t", "prompt": "p", "max_new_tokens": 0}', '"max_new_tokens" must be'),
    ],
)
def test_bad_line_gives_a_clear_message(line: str, fragment: str) -> None:
    good = '{"id": "ok", "title": "Fine", "prompt": "p"}'
    examples, problems = parse_jsonl(f"{good}\n\n{line}\n", source="mine.jsonl")
    assert [e.id for e in examples] == ["ok"]  # the good line is kept
    assert len(problems) == 1
    assert problems[0].startswith("mine.jsonl, line 3: ") and fragment in problems[0], problems[0]


def test_duplicate_ids_and_comments() -> None:
    text = '// my set\n{"id": "a", "title": "t", "prompt": "p"}\n{"id": "a", "title": "u", "prompt": "q"}\n'
    examples, problems = parse_jsonl(text, known_ids=[])
    assert [e.title for e in examples] == ["t"]
    assert problems == ['line 3: id "a" is already used; give this example another id']
    _, problems = parse_jsonl('{"id": "b", "title": "t", "prompt": "p"}', known_ids=["b"])
    assert "already used" in problems[0]


def test_upload_decoding(tmp_path: Path) -> None:
    examples, problems = decode_upload(
        b"\xef\xbb\xbf" + b'{"id": "u", "title": "T", "prompt": "p"}\n', "u.jsonl", []
    )
    assert [e.id for e in examples] == ["u"] and problems == [] and examples[0].source == "u.jsonl"
    assert "not UTF-8" in decode_upload(b"\xff\xfe{", "bad.jsonl", [])[1][0]
    assert "no examples found" in decode_upload(b"\n\n", "empty.jsonl", [])[1][0]
    missing = load_examples(tmp_path / "nope.jsonl")
    assert missing[0] == [] and "could not read" in missing[1][0]


def test_loading_an_example_sets_its_target_and_settings() -> None:
    examples, _ = load_examples()
    by_id = {e.id: e for e in examples}
    current = SideState(method="GRAD_DOT_INPUT", selection=(3,), candidate=2, granularity="LINES")
    loaded = side_for_example(by_id["gsm8k-socratic-plain"], current)
    assert loaded.prompt == by_id["gsm8k-socratic-plain"].prompt
    assert loaded.target_kind == "reference" and loaded.reference.endswith("#### 31")
    assert loaded.granularity == "WORDS" and loaded.stop == ("\n\nQuestion:",)
    assert loaded.method == "GRAD_DOT_INPUT"  # the user's method stays
    assert loaded.selection == () and loaded.candidate == 0


def test_example_texts_segment_as_the_paper_describes(tiny_llama_dir: Path) -> None:
    """The restaurant target splits into the Analysis and Recommendation sentences."""
    from seqsal.v1 import common_pb2
    from server_kit.model_registry import load_tokenizer
    from server_kit.tokenization import tokenize

    example = {e.id: e for e in load_examples()[0]}["restaurant-copy-paste"]
    tokens = tokenize(
        load_tokenizer(tiny_llama_dir), example.target, part=common_pb2.TARGET, add_special_tokens=False
    )
    segments = segment_tokens(tokens, common_pb2.SENTENCES)
    assert [s.text.strip() for s in segments] == [
        "A savoury tart with cheese and eggs",
        "Recommendation: You might not like it, but it's worth trying.",
    ]
