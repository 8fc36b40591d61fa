"""Tests for ``seqsal.segmentation``: the rules on hand-made token lists, plus property tests."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqsal.errors import InvalidArgumentError
from seqsal.segmentation import (
    MAX_REGEX_CHARS,
    REGEX_SYNTAX,
    char_boundaries,
    part_texts,
    segment_target_masks,
    segment_tokens,
    special_flags,
    template_markers,
    template_tokens,
    validate_regex,
    with_scores,
)
from seqsal.v1 import common_pb2

PROMPT, TARGET, FOIL = common_pb2.PROMPT, common_pb2.TARGET, common_pb2.FOIL
ALL_GRANULARITIES = (
    common_pb2.TOKENS,
    common_pb2.WORDS,
    common_pb2.SENTENCES,
    common_pb2.LINES,
    common_pb2.PARAGRAPHS,
    common_pb2.CUSTOM_REGEX,
)


@dataclass(frozen=True)
class Special:
    """A special token piece (BOS, EOS...) for ``tile``."""

    text: str


BOS = Special("<s>")
Piece = str | Special


def tile(pieces: Sequence[Piece], part: int = PROMPT, first_id: int = 0) -> list[common_pb2.Token]:
    """Tokens of one part: plain strings tile the part text, ``Special`` pieces cover no chars."""
    tokens: list[common_pb2.Token] = []
    pos = 0
    for i, piece in enumerate(pieces):
        if isinstance(piece, Special):
            tokens.append(
                common_pb2.Token(
                    id=first_id + i, text=piece.text, start=pos, end=pos, special=True, part=part
                )
            )
        else:
            tokens.append(
                common_pb2.Token(id=first_id + i, text=piece, start=pos, end=pos + len(piece), part=part)
            )
            pos += len(piece)
    return tokens


def texts(segments: Sequence[common_pb2.Segment]) -> list[str]:
    """The segments' texts."""
    return [s.text for s in segments]


# "Hello world. How are you?\nFine!\n\nNew para." in GPT-2 style (leading spaces) ...
GPT2 = ["Hello", " world", ".", " How", " are", " you", "?", "\n", "Fine", "!", "\n\n", "New", " para", "."]
# ... and in SentencePiece style ('▁' marks a space; the '▁' are part of the text).
SP = [
    "▁Hello",
    "▁world",
    ".",
    "▁How",
    "▁are",
    "▁you",
    "?",
    "\n",
    "Fine",
    "!",
    "\n",
    "\n",
    "New",
    "▁para",
    ".",
]


@pytest.mark.parametrize(
    ("granularity", "expected"),
    [
        (common_pb2.TOKENS, GPT2),
        (
            common_pb2.WORDS,
            ["Hello", " world.", " How", " are", " you?", "\n", "Fine!", "\n\n", "New", " para."],
        ),
        (common_pb2.SENTENCES, ["Hello world.", " How are you?\n", "Fine!\n\n", "New para."]),
        (common_pb2.LINES, ["Hello world. How are you?\n", "Fine!\n\n", "New para."]),
        (common_pb2.PARAGRAPHS, ["Hello world. How are you?\nFine!\n\n", "New para."]),
    ],
)
def test_gpt2_style(granularity: int, expected: list[str]) -> None:
    tokens = tile(GPT2)
    segments = segment_tokens(tokens, granularity)
    assert texts(segments) == expected
    assert all(s.part == PROMPT and not s.scores for s in segments)
    assert segments[0].token_start == 0 and segments[-1].token_end == len(tokens)


@pytest.mark.parametrize(
    ("granularity", "expected"),
    [
        (common_pb2.TOKENS, SP),
        (
            common_pb2.WORDS,
            ["▁Hello", "▁world.", "▁How", "▁are", "▁you?", "\n", "Fine!", "\n", "\n", "New", "▁para."],
        ),
        (common_pb2.SENTENCES, ["▁Hello▁world.", "▁How▁are▁you?\n", "Fine!\n\n", "New▁para."]),
        (common_pb2.LINES, ["▁Hello▁world.▁How▁are▁you?\n", "Fine!\n\n", "New▁para."]),
        (common_pb2.PARAGRAPHS, ["▁Hello▁world.▁How▁are▁you?\nFine!\n\n", "New▁para."]),
    ],
)
def test_sentencepiece_style(granularity: int, expected: list[str]) -> None:
    assert texts(segment_tokens(tile(SP), granularity)) == expected


def test_segment_fields() -> None:
    tokens = tile(GPT2)
    first, second = segment_tokens(tokens, common_pb2.SENTENCES)[:2]
    assert (first.token_start, first.token_end, first.char_start, first.char_end) == (0, 3, 0, 12)
    assert (second.token_start, second.token_end, second.char_start, second.char_end) == (3, 8, 12, 26)
    text = part_texts(tokens)[PROMPT]
    assert text == "Hello world. How are you?\nFine!\n\nNew para."
    assert text[second.char_start : second.char_end] == second.text == " How are you?\n"


def test_unspecified_gives_no_segments() -> None:
    assert segment_tokens(tile(GPT2), common_pb2.GRANULARITY_UNSPECIFIED) == []


def test_empty_tokens() -> None:
    assert segment_tokens([], common_pb2.WORDS) == []
    assert part_texts([]) == {}


def test_unknown_granularity() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        segment_tokens(tile(GPT2), 99)
    assert info.value.field == "granularity"
    assert "99" in info.value.message


def test_boundary_inside_token_moves_whole_token() -> None:
    # ".\n" is one token and "Hi. There" splits inside "i. T": whole tokens start segments.
    tokens = tile(["Hi", ". T", "here", ".\nB", "ye"])
    assert texts(segment_tokens(tokens, common_pb2.SENTENCES)) == ["Hi", ". There", ".\nBye"]
    assert texts(segment_tokens(tokens, common_pb2.LINES)) == ["Hi. There", ".\nBye"]


def test_sentence_rule_details() -> None:
    boundaries = char_boundaries("A. B?  C!\tD... E.\n F. \nG.  ", common_pb2.SENTENCES)
    # After "A." (2), "B?" (5), "C!" (9), "D..." (14); newline runs give 18 (after "\n") and 23.
    assert boundaries == {2, 5, 9, 14, 18, 23}
    assert char_boundaries("e.g.x 3.14 end.", common_pb2.SENTENCES) == set()


def test_lines_and_paragraph_rules() -> None:
    text = "a\nb\n\nc\n \n\td\r\n\r\ne\n\n\nf\n"
    assert char_boundaries(text, common_pb2.LINES) == {2, 5, 7, 9, 13, 15, 19, 21}
    # Blank lines may hold spaces; the next paragraph keeps its indentation; "\r\n\r\n" counts.
    assert char_boundaries(text, common_pb2.PARAGRAPHS) == {5, 9, 15, 19}
    tokens = tile(["a", "\n", "b", "\n \n", "\tc", "\n"])
    assert texts(segment_tokens(tokens, common_pb2.PARAGRAPHS)) == ["a\nb\n \n", "\tc\n"]
    assert texts(segment_tokens(tokens, common_pb2.LINES)) == ["a\n", "b", "\n \n", "\tc\n"]


def test_words_after_newline_skips_empty_tokens() -> None:
    tokens = tile(["one", "\n", "", "two", "three", " four"])
    assert texts(segment_tokens(tokens, common_pb2.WORDS)) == ["one", "\n", "twothree", " four"]


def test_special_bos() -> None:
    tokens = tile([BOS, "Hello", " world", ".", " How", "?"])
    segments = segment_tokens(tokens, common_pb2.SENTENCES)
    assert texts(segments) == ["<s>", "Hello world.", " How?"]
    bos = segments[0]
    assert (bos.token_start, bos.token_end, bos.char_start, bos.char_end) == (0, 1, 0, 0)
    assert (segments[1].token_start, segments[1].char_start, segments[1].char_end) == (1, 0, 12)
    assert part_texts(tokens) == {PROMPT: "Hello world. How?"}
    assert texts(segment_tokens(tokens, common_pb2.PARAGRAPHS)) == ["<s>", "Hello world. How?"]


def test_special_token_in_the_middle_is_its_own_segment() -> None:
    tokens = tile(["Hi", Special("<sep>"), "there", " you", Special("</s>")])
    assert texts(segment_tokens(tokens, common_pb2.WORDS)) == ["Hi", "<sep>", "there", " you", "</s>"]
    for granularity in (common_pb2.SENTENCES, common_pb2.LINES, common_pb2.PARAGRAPHS):
        assert texts(segment_tokens(tokens, granularity)) == ["Hi", "<sep>", "there you", "</s>"]
    sep, end = segment_tokens(tokens, common_pb2.LINES)[1::2]
    assert (sep.char_start, sep.char_end, end.char_start, end.char_end) == (2, 2, 11, 11)


QWEN = [
    "<|im_start|>", "system", "\n", "You", " are", " helpful", ".", "<|im_end|>", "\n",
    "<|im_start|>", "user", "\n", "Hugging", " Face", "<|im_end|>", "\n",
    "<|im_start|>", "assistant", "\n",
]  # fmt: skip


@pytest.mark.parametrize("granularity", ALL_GRANULARITIES)
def test_chat_template_markers_are_segments_of_their_own(granularity: int) -> None:
    tokens = tile([BOS, *QWEN])
    got = texts(segment_tokens(tokens, granularity, r"\n"))
    for marker in ("<|im_start|>", "<|im_end|>"):
        assert got.count(marker) == QWEN.count(marker)  # never merged into a sentence
    assert not any(t.endswith("Face<|im_end|>") for t in got)
    if granularity == common_pb2.SENTENCES:
        assert got == [
            "<s>", "<|im_start|>", "system\n", "You are helpful.", "<|im_end|>", "\n", "<|im_start|>",
            "user\n", "Hugging Face", "<|im_end|>", "\n", "<|im_start|>", "assistant\n",
        ]  # fmt: skip
    flags = special_flags(tokens)
    assert [t.text for t, f in zip(tokens, flags, strict=True) if f] == ["<s>"] + [
        p for p in QWEN if p.startswith("<|")
    ]
    assert template_markers(tokens) == [f and not t.special for t, f in zip(tokens, flags, strict=True)]


def test_a_marker_split_into_tokens_is_one_segment() -> None:
    tokens = tile(["<", "|", "user", "|>\n", "Hello", " there", ".", " Bye", "[/", "INST", "]"])
    expected = ["<|user|>\n", "Hello there.", " Bye", "[/INST]"]
    assert texts(segment_tokens(tokens, common_pb2.SENTENCES)) == expected
    assert template_markers(tokens) == [True] * 4 + [False] * 4 + [True] * 3


def test_template_tokens_are_everything_around_the_users_text() -> None:
    tokens = tile([BOS, *QWEN])
    template = template_tokens(tokens, "Hugging Face")
    assert "".join(t.text for t, f in zip(tokens, template, strict=True) if not f) == "Hugging Face"
    # Without the user's text (or when it is not in the prompt), only markers and special tokens.
    assert template_tokens(tokens, "") == special_flags(tokens)
    assert template_tokens(tokens, "not there") == special_flags(tokens)
    target = tile(["<|im_end|>"], part=TARGET)
    assert template_tokens([*tokens, *target], "Hugging Face")[-1]  # a marker in the target too


def prompt_target() -> list[common_pb2.Token]:
    """A prompt with BOS, then a target that does not start with a space."""
    prompt = tile([BOS, "Question", ":", " hi", " there"], PROMPT)
    target = tile(["Answer", ":", " yes", ".", " No", "."], TARGET, first_id=100)
    return prompt + target


def test_part_boundaries() -> None:
    tokens = prompt_target()
    assert part_texts(tokens) == {PROMPT: "Question: hi there", TARGET: "Answer: yes. No."}
    segments = segment_tokens(tokens, common_pb2.PARAGRAPHS)
    assert texts(segments) == ["<s>", "Question: hi there", "Answer: yes. No."]
    assert [s.part for s in segments] == [PROMPT, PROMPT, TARGET]
    assert (segments[2].token_start, segments[2].token_end) == (5, 11)
    assert (segments[2].char_start, segments[2].char_end) == (0, 16)
    sentences = segment_tokens(tokens, common_pb2.SENTENCES)
    assert texts(sentences) == ["<s>", "Question: hi there", "Answer: yes.", " No."]


def test_foil_part() -> None:
    tokens = prompt_target() + tile([" Maybe", "."], FOIL, first_id=200)
    segments = segment_tokens(tokens, common_pb2.WORDS)
    assert texts(segments)[-1] == " Maybe."
    assert segments[-1].part == FOIL and segments[-2].part == TARGET
    assert part_texts(tokens)[FOIL] == " Maybe."


def test_custom_regex() -> None:
    pieces = ["T", "aste", "-", "A", ":", " sweet", ".", " T", "aste", "-", "B", ":", " sour", ".", "\n"]
    pieces += ["Analysis", ":", " both", " good", "."]
    segments = segment_tokens(tile(pieces), common_pb2.CUSTOM_REGEX, r"Taste-|Analysis:")
    assert texts(segments) == ["Taste-A: sweet.", " Taste-B: sour.\n", "Analysis: both good."]


def test_custom_regex_zero_length_and_other_granularities_ignore_it() -> None:
    tokens = tile(["ab", " cd", "\n", "ef"])
    assert texts(segment_tokens(tokens, common_pb2.CUSTOM_REGEX, r"(?m)^")) == ["ab cd\n", "ef"]
    assert texts(segment_tokens(tokens, common_pb2.CUSTOM_REGEX, r"\bc")) == ["ab", " cd\nef"]
    assert texts(segment_tokens(tokens, common_pb2.LINES, r"(")) == ["ab cd\n", "ef"]


@pytest.mark.parametrize("pattern", [r"x*", r"a?", r"(|b)", r"[^\n]*", r"\b|\B"])
def test_regex_matching_the_empty_string_everywhere_is_rejected(pattern: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_regex(pattern)
    assert info.value.field == "custom_regex"
    assert repr(pattern) in info.value.message
    assert "empty string everywhere" in info.value.message and "TOKENS" in info.value.message


@pytest.mark.parametrize("pattern", [r"\B", r"x*\B", r"\Bx?"])
def test_regex_matching_the_empty_string_inside_words_is_rejected(pattern: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_regex(pattern)
    assert info.value.field == "custom_regex" and repr(pattern) in info.value.message
    assert "inside words" in info.value.message and "TOKENS" in info.value.message
    assert "\\b" in info.value.message and "(?m)^" in info.value.message  # the fix


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", "invalid escape sequence"),
        (r"(?=c)", "invalid perl operator"),
        (r"(?!c)d", "invalid perl operator"),
        (r"(?<=a)b", "invalid perl operator"),
        (r"(?<!a)b", "invalid perl operator"),
        (r"(?P<x>a)(?P=x)", "invalid perl operator"),
        (r"a{1001}", "invalid repetition size"),
    ],
)
def test_unsupported_regex_names_re2_and_the_fix(pattern: str, reason: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_regex(pattern)
    assert info.value.field == "custom_regex"
    assert repr(pattern) in info.value.message and reason in info.value.message
    assert REGEX_SYNTAX in info.value.message
    assert "RE2 syntax" in REGEX_SYNTAX and "backreferences" in REGEX_SYNTAX and "lookaround" in REGEX_SYNTAX


def test_regex_length_limit() -> None:
    assert validate_regex("a" * MAX_REGEX_CHARS).pattern == "a" * MAX_REGEX_CHARS
    with pytest.raises(InvalidArgumentError) as info:
        validate_regex("a" * (MAX_REGEX_CHARS + 1))
    assert info.value.field == "custom_regex" and str(MAX_REGEX_CHARS) in info.value.message


def test_catastrophic_regex_is_linear() -> None:
    """(a+)+$ backtracks exponentially in Python's re; RE2 finds no match at once."""
    text = "a" * 3000 + "b"
    tokens = tile([text[i : i + 7] for i in range(0, len(text), 7)])
    assert texts(segment_tokens(tokens, common_pb2.CUSTOM_REGEX, r"(a+)+$")) == [text]
    assert texts(segment_tokens(tokens, common_pb2.CUSTOM_REGEX, r"(a+)+b")) == [text]


def test_custom_regex_offsets_are_chars_not_bytes() -> None:
    tokens = tile(["é€", "😀 x", "-y"])
    assert texts(segment_tokens(tokens, common_pb2.CUSTOM_REGEX, r"-")) == ["é€😀 x", "-y"]
    assert texts(segment_tokens(tokens, common_pb2.CUSTOM_REGEX, r"\pL")) == ["é€", "😀 x", "-y"]


def test_invalid_regex() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        segment_tokens(tile(GPT2), common_pb2.CUSTOM_REGEX, r"Taste-(")
    assert info.value.field == "custom_regex"
    assert "'Taste-('" in info.value.message
    assert "missing )" in info.value.message
    with pytest.raises(InvalidArgumentError) as empty:
        segment_tokens(tile(GPT2), common_pb2.CUSTOM_REGEX, "")
    assert empty.value.field == "custom_regex"
    with pytest.raises(InvalidArgumentError):
        validate_regex("")
    with pytest.raises(InvalidArgumentError) as bad:
        validate_regex("a**")
    assert "'a**'" in str(bad.value)
    assert validate_regex(r"\d+").pattern == r"\d+"


def test_broken_tiling_raises_value_error() -> None:
    tokens = tile(["ab", "cd"])
    tokens[1].start = 3
    tokens[1].end = 5
    with pytest.raises(ValueError, match="does not tile"):
        segment_tokens(tokens, common_pb2.WORDS)
    with pytest.raises(ValueError, match="does not tile"):
        part_texts(tokens)
    interleaved = tile(["a"], PROMPT) + tile(["b"], TARGET) + tile(["c"], PROMPT)
    with pytest.raises(ValueError, match="not contiguous"):
        segment_tokens(interleaved, common_pb2.TOKENS)


def test_with_scores() -> None:
    tokens = prompt_target()
    segments = segment_tokens(tokens, common_pb2.SENTENCES)
    grad = [float(i) for i in range(len(tokens))]
    signed = [(-1.0) ** i * 0.5 for i in range(len(tokens))]
    scored = with_scores(segments, [grad, signed])
    assert [list(s.scores) for s in scored] == [
        [0.0, 0.5],
        [1.0 + 2 + 3 + 4, 0.0],
        [5.0 + 6 + 7 + 8, 0.0],
        [9.0 + 10, 0.0],
    ]
    assert all(not s.scores for s in segments)  # the inputs are not modified
    assert [s.text for s in scored] == texts(segments)
    assert [list(s.scores) for s in with_scores(segments, [])] == [[]] * 4
    with pytest.raises(ValueError):
        with_scores(segments, [grad, grad[:-1]])
    with pytest.raises(ValueError):
        with_scores(segments, [grad[:5]])


def test_with_scores_uses_float64() -> None:
    tokens = tile(["a", "b", "c"])
    segments = segment_tokens(tokens, common_pb2.PARAGRAPHS)
    (scored,) = with_scores(segments, [[1e20, 1.0, -1e20]])
    assert scored.scores[0] == 1.0


def test_segment_target_masks() -> None:
    tokens = prompt_target()
    segments = segment_tokens(tokens, common_pb2.SENTENCES)
    masks = segment_target_masks(tokens, segments)
    assert [seg.text for seg, _ in masks] == ["Answer: yes.", " No."]
    assert [mask for _, mask in masks] == [
        [True, True, True, True, False, False],
        [False, False, False, False, True, True],
    ]
    words = segment_target_masks(tokens, segment_tokens(tokens, common_pb2.WORDS))
    assert [seg.text for seg, _ in words] == ["Answer:", " yes.", " No."]
    assert words[1][1] == [False, False, True, True, False, False]
    assert segment_target_masks(tile(GPT2), segment_tokens(tile(GPT2), common_pb2.WORDS)) == []


# --- property tests ---------------------------------------------------------------------------

ALPHABET = "ab .?!\n\t\r▁-:"
REGEXES = (r"\.", r"a+", r"b|:", r"\ba", r"(?m)^", r"\n\n", r"-", r"$")


@st.composite
def part_pieces(draw: st.DrawFn) -> list[Piece]:
    """A random part text split into random tiled pieces, with random special tokens."""
    text = draw(st.text(alphabet=ALPHABET, max_size=40))
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=len(text) + 2)))
    bounds = [0, *cuts, len(text)]
    pieces: list[Piece] = [text[a:b] for a, b in itertools.pairwise(bounds)]
    pieces = [p for p in pieces if p] if draw(st.booleans()) else pieces  # maybe keep empty pieces
    for _ in range(draw(st.integers(0, 2))):
        pieces.insert(draw(st.integers(0, len(pieces))), Special("<s>"))
    return pieces if pieces else [Special("</s>")]


@st.composite
def token_lists(draw: st.DrawFn) -> list[common_pb2.Token]:
    """Tokens of one to three parts, in PROMPT, TARGET, FOIL order."""
    parts = draw(st.sampled_from([[PROMPT], [PROMPT, TARGET], [PROMPT, TARGET, FOIL], [TARGET]]))
    tokens: list[common_pb2.Token] = []
    for part in parts:
        tokens += tile(draw(part_pieces()), part, first_id=len(tokens))
    return tokens


@settings(max_examples=150, deadline=None)
@given(
    tokens=token_lists(),
    granularity=st.sampled_from(ALL_GRANULARITIES),
    regex=st.sampled_from(REGEXES),
    data=st.data(),
)
def test_segments_partition_tokens(
    tokens: list[common_pb2.Token], granularity: int, regex: str, data: st.DataObject
) -> None:
    segments = segment_tokens(tokens, granularity, regex)
    texts_by_part = part_texts(tokens)

    # Contiguous, non-empty, covering every token exactly once.
    assert segments[0].token_start == 0 and segments[-1].token_end == len(tokens)
    for a, b in itertools.pairwise(segments):
        assert a.token_end == b.token_start
    assert all(s.token_start < s.token_end for s in segments)
    if granularity == common_pb2.TOKENS:
        assert len(segments) == len(tokens)

    rebuilt: dict[int, str] = {}
    for s in segments:
        members = tokens[s.token_start : s.token_end]
        assert {t.part for t in members} == {s.part}  # never crosses a part boundary
        assert s.text == "".join(t.text for t in members)
        if any(t.special for t in members):
            assert len(members) == 1 and s.char_start == s.char_end
            continue
        assert texts_by_part[s.part][s.char_start : s.char_end] == s.text
        assert s.char_end - s.char_start == len(s.text)
        rebuilt[s.part] = rebuilt.get(s.part, "") + s.text
    for part, text in texts_by_part.items():
        assert rebuilt.get(part, "") == text
    # Each part's first token starts a segment; a special token is alone and ends its segment.
    starts = {s.token_start for s in segments}
    for i, t in enumerate(tokens):
        if i == 0 or t.part != tokens[i - 1].part or t.special or tokens[i - 1].special:
            assert i in starts

    # Per-method segment scores sum to the token score totals.
    score_lists = st.lists(st.floats(-100, 100, width=32), min_size=len(tokens), max_size=len(tokens))
    methods = [data.draw(score_lists), data.draw(score_lists)]
    scored = with_scores(segments, methods)
    for m, row in enumerate(methods):
        assert math.isclose(sum(s.scores[m] for s in scored), math.fsum(row), abs_tol=1e-3)

    # Target masks: one per TARGET segment, disjoint, together selecting every target token.
    masks = segment_target_masks(tokens, segments)
    n_target = sum(t.part == TARGET for t in tokens)
    assert all(len(mask) == n_target for _, mask in masks)
    if n_target:
        assert [sum(col) for col in zip(*(mask for _, mask in masks), strict=True)] == [1] * n_target
    else:
        assert masks == []


@settings(max_examples=100, deadline=None)
@given(tokens=token_lists())
def test_coarser_granularities_merge_finer_segments(tokens: list[common_pb2.Token]) -> None:
    def starts(granularity: int) -> set[int]:
        return {s.token_start for s in segment_tokens(tokens, granularity)}

    paragraphs, lines = starts(common_pb2.PARAGRAPHS), starts(common_pb2.LINES)
    sentences, every = starts(common_pb2.SENTENCES), starts(common_pb2.TOKENS)
    assert paragraphs <= lines <= sentences <= every
    assert starts(common_pb2.WORDS) <= every


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=ALPHABET + "xyz,", max_size=60), pattern=st.sampled_from(REGEXES[:-1]))
def test_re2_boundaries_match_python_re_for_ordinary_patterns(text: str, pattern: str) -> None:
    """Patterns both engines support mean the same thing (``$`` differs: see the module docstring)."""
    expected = {m.start() for m in re.finditer(pattern, text)}
    assert char_boundaries(text, common_pb2.CUSTOM_REGEX, validate_regex(pattern)) == expected
