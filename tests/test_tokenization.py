"""server_kit.tokenization on every tiny architecture's tokenizer: tiling, special tokens, ids -> tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import ARCHITECTURES

from seqsal.errors import InvalidArgumentError
from seqsal.v1 import common_pb2
from server_kit.model_registry import load_tokenizer
from server_kit.tokenization import REPLACEMENT_CHAR, part_text, tokenize, tokens_from_ids

EXPECTED_BOS = {"gpt2": None, "llama": "<s>", "mistral": "<s>", "gemma": "<bos>", "qwen2": None}

TEXTS = [
    "The capital of France is Paris.",
    "line one\nline two\n\n  indented,   three spaces\n",
    "  leading and trailing spaces  ",
    "emoji 🙂🎉 and CJK 世界, accents café naïve",
    "e\u0301 (a combining accent), Ω and ﬁ ligature",
    "tab\tseparated\r\nwindows line end",
    "\n",
    " ",
    "   ",
    "🙂",
    "a",
    "",
]

HYPOTHESIS_SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Random text with the awkward parts over-represented: multi-byte chars, whitespace runs, the
# Metaspace "▁", combining marks, and special tokens' literal forms typed by the user.
PIECES = st.sampled_from(
    [
        " ",
        "  ",
        "\n",
        "\n\n",
        "\r\n",
        "\t",
        "🙂",
        "👍🏽",
        "世界",
        "é",
        "e\u0301",
        "▁",
        "<s>",
        "<bos>",
        "<|endoftext|>",
    ]
)
RANDOM_TEXT = st.lists(st.one_of(st.text(max_size=6), PIECES), max_size=8).map("".join)


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dirs: dict[str, Path]) -> dict[str, Any]:
    return {arch: load_tokenizer(path) for arch, path in tiny_model_dirs.items()}


def assert_tiles(tokens: Sequence[common_pb2.Token], text: str, part: int) -> None:
    """Non-special tokens cover ``text`` exactly, in order; specials sit at a position, empty."""
    cursor = 0
    for token in tokens:
        assert token.part == part
        if token.special:
            assert token.start == token.end == cursor
            continue
        assert token.start == cursor, (tokens, text)
        assert token.end >= token.start
        assert token.text == text[token.start : token.end]
        cursor = token.end
    assert cursor == len(text), (tokens, text)
    assert part_text(tokens) == text


def assert_tokens_from_ids(tokenizer: Any, ids: Sequence[int]) -> None:
    tokens = tokens_from_ids(tokenizer, ids, part=common_pb2.TARGET, field="target_token_ids")
    assert [t.id for t in tokens] == list(ids)
    assert part_text(tokens) == tokenizer.decode(list(ids), skip_special_tokens=True)
    special_ids = set(tokenizer.all_special_ids)
    cursor = 0
    for token in tokens:
        assert token.part == common_pb2.TARGET
        assert token.special == (token.id in special_ids)
        assert token.start == cursor
        if token.special:
            assert token.end == token.start
            assert token.text == tokenizer.convert_ids_to_tokens(token.id)
        else:
            assert token.end == token.start + len(token.text)
            cursor = token.end


# --- tokenize -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("as_target", [False, True])
def test_tokenize_tiles_the_text(arch: str, text: str, as_target: bool, tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers[arch]
    part = common_pb2.TARGET if as_target else common_pb2.PROMPT
    tokens = tokenize(tokenizer, text, part=part, add_special_tokens=not as_target)
    assert_tiles(tokens, text, part)
    # The ids are the tokenizer's own, unchanged.
    assert [t.id for t in tokens] == tokenizer(text, add_special_tokens=not as_target)["input_ids"]
    if text:
        assert any(not t.special for t in tokens)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prompt_gets_bos_exactly_where_the_family_adds_one(arch: str, tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers[arch]
    text = "The capital of France is"
    prompt = tokenize(tokenizer, text, part=common_pb2.PROMPT, add_special_tokens=True)
    target = tokenize(tokenizer, text, part=common_pb2.TARGET, add_special_tokens=False)
    bos = EXPECTED_BOS[arch]
    if bos is None:
        assert not any(t.special for t in prompt)
    else:
        first = prompt[0]
        assert first.special
        assert first.text == bos
        assert first.id == tokenizer.bos_token_id
        assert (first.start, first.end) == (0, 0)
        assert [t.special for t in prompt[1:]] == [False] * (len(prompt) - 1)
    # A target never gets special tokens; otherwise it is tokenised the same way.
    assert not any(t.special for t in target)
    assert [t.id for t in prompt if not t.special] == [t.id for t in target]
    assert [(t.start, t.end, t.text) for t in prompt if not t.special] == [
        (t.start, t.end, t.text) for t in target
    ]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_multibyte_chars_go_whole_to_one_token(arch: str, tokenizers: dict[str, Any]) -> None:
    """A char split over byte tokens is on one of them; the others are empty, still in place."""
    tokenizer = tokenizers[arch]
    text = "a🙂b"
    tokens = tokenize(tokenizer, text, part=common_pb2.TARGET, add_special_tokens=False)
    assert_tiles(tokens, text, common_pb2.TARGET)
    assert len(tokens) > 3  # the tiny vocabularies have no emoji: it is split into bytes
    assert [t.text for t in tokens if t.text] == ["a", "🙂", "b"]


def test_slow_tokenizer_is_refused() -> None:
    class Slow:
        is_fast = False

    with pytest.raises(InvalidArgumentError) as info:
        tokenize(Slow(), "text", part=common_pb2.PROMPT, add_special_tokens=True)
    assert info.value.field == "model"


@pytest.mark.parametrize("arch", ARCHITECTURES)
@HYPOTHESIS_SETTINGS
@given(text=RANDOM_TEXT, as_target=st.booleans())
def test_tokenize_tiles_random_text(
    arch: str, text: str, as_target: bool, tokenizers: dict[str, Any]
) -> None:
    tokenizer = tokenizers[arch]
    tokens = tokenize(tokenizer, text, part=common_pb2.PROMPT, add_special_tokens=not as_target)
    assert_tiles(tokens, text, common_pb2.PROMPT)
    assert [t.id for t in tokens] == tokenizer(text, add_special_tokens=not as_target)["input_ids"]


# --- tokens_from_ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("text", TEXTS)
def test_tokens_from_ids_concatenate_to_the_decoding(
    arch: str, text: str, tokenizers: dict[str, Any]
) -> None:
    tokenizer = tokenizers[arch]
    assert_tokens_from_ids(tokenizer, tokenizer(text)["input_ids"])  # with the special tokens
    assert_tokens_from_ids(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tokens_from_ids_with_special_tokens_inside(arch: str, tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers[arch]
    ids = tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    tokens = tokens_from_ids(tokenizer, [*ids, eos, *ids], part=common_pb2.TARGET, field="target_token_ids")
    eos_token = tokens[len(ids)]
    assert eos_token.special
    assert eos_token.text == tokenizer.eos_token
    assert eos_token.start == eos_token.end == len(part_text(tokens[: len(ids)]))
    assert_tokens_from_ids(tokenizer, [*ids, eos, *ids])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tokens_from_ids_splitting_a_multibyte_char(arch: str, tokenizers: dict[str, Any]) -> None:
    """Ids that end inside a char, or hold its bytes in several tokens, still decode consistently."""
    tokenizer = tokenizers[arch]
    ids = tokenizer("a🙂b 世", add_special_tokens=False)["input_ids"]
    mid_char = 0
    for k in range(len(ids) + 1):
        prefix = ids[:k]
        assert_tokens_from_ids(tokenizer, prefix)
        if tokenizer.decode(prefix, skip_special_tokens=True).endswith(REPLACEMENT_CHAR):
            mid_char += 1
    assert mid_char >= 3  # the emoji's 4 bytes and the CJK char's 3 are separate tokens
    tokens = tokens_from_ids(tokenizer, ids, part=common_pb2.TARGET, field="target_token_ids")
    # Bytes before the last of a char get empty text; the completing token carries the char.
    assert sum("🙂" in t.text for t in tokens) == 1
    assert sum("世" in t.text for t in tokens) == 1
    assert not any(REPLACEMENT_CHAR in t.text for t in tokens)
    assert sum(t.text == "" for t in tokens) >= 5  # 3 + 2 leading bytes


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma"])
def test_tokens_from_ids_when_byte_fallback_rewrites_earlier_text(
    arch: str, tokenizers: dict[str, Any]
) -> None:
    """Byte fallback decodes a run of byte tokens that is not valid UTF-8 as one U+FFFD per byte,
    including bytes that earlier tokens had already completed into a valid char."""
    tokenizer = tokenizers[arch]
    c2, x80 = tokenizer.convert_tokens_to_ids(["<0xC2>", "<0x80>"])
    head = tokenizer("01", add_special_tokens=False)["input_ids"]
    tail = tokenizer(" end", add_special_tokens=False)["input_ids"]
    # "\x80" is the 2-byte char C2 80; a lone C2 after it spoils the whole run, at the end or inside.
    for ids in (
        [*head, c2, x80, c2],
        [*head, c2, x80, c2, *tail],
        [tokenizer.eos_token_id, c2, x80, c2, *tail],
    ):
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert REPLACEMENT_CHAR * 3 in decoded  # the rewrite this test is about
        for cut in range(len(ids) + 1):
            assert_tokens_from_ids(tokenizer, ids[:cut])
    tokens = tokens_from_ids(
        tokenizer, [*head, c2, x80, c2], part=common_pb2.TARGET, field="target_token_ids"
    )
    assert [t.text for t in tokens][-3:] == ["", "", REPLACEMENT_CHAR * 3]


def test_gpt2_byte_tokens_of_an_emoji(tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers["gpt2"]
    ids = tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4
    tokens = tokens_from_ids(tokenizer, ids, part=common_pb2.TARGET, field="target_token_ids")
    assert [t.text for t in tokens] == ["", "", "", "🙂"]
    assert [(t.start, t.end) for t in tokens] == [(0, 0), (0, 0), (0, 0), (0, 1)]
    # Cut after two bytes: the decoding ends in replacement chars, and the tokens say the same.
    cut = tokens_from_ids(tokenizer, ids[:2], part=common_pb2.TARGET, field="target_token_ids")
    assert part_text(cut) == tokenizer.decode(ids[:2], skip_special_tokens=True)
    assert part_text(cut).endswith(REPLACEMENT_CHAR)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("bad", [-1, None])
def test_out_of_range_id_names_the_field(arch: str, bad: int | None, tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers[arch]
    bad_id = len(tokenizer) if bad is None else bad
    with pytest.raises(InvalidArgumentError) as info:
        tokens_from_ids(tokenizer, [5, 6, bad_id], part=common_pb2.TARGET, field="target_token_ids")
    assert info.value.field == "target_token_ids"
    assert "target_token_ids[2]" in str(info.value)
    assert str(bad_id) in str(info.value)
    # The largest valid id is fine.
    assert len(tokens_from_ids(tokenizer, [len(tokenizer) - 1], part=common_pb2.FOIL, field="foil")) == 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
@HYPOTHESIS_SETTINGS
@given(text=RANDOM_TEXT, data=st.data())
def test_tokens_from_ids_random_text(
    arch: str, text: str, data: st.DataObject, tokenizers: dict[str, Any]
) -> None:
    tokenizer = tokenizers[arch]
    ids = tokenizer(text)["input_ids"]
    assert_tokens_from_ids(tokenizer, ids)
    cut = data.draw(st.integers(0, len(ids)), label="cut")  # may end inside a multi-byte char
    assert_tokens_from_ids(tokenizer, ids[:cut])
