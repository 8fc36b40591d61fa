"""Candidate text from token ids, unary and streamed, with stop strings and partial characters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference_server.detokenize import StreamedText, candidate_text, text_token_count
from server_kit.model_registry import load_tokenizer


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dirs: dict[str, Path]) -> dict[str, object]:
    return {arch: load_tokenizer(tiny_model_dirs[arch]) for arch in ("gpt2", "llama")}


def stream(tokenizer: object, ids: list[int], stop: list[str], chunk: int = 1) -> list[str]:
    text = StreamedText(tokenizer, stop)
    deltas = []
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        deltas.append(text.push(piece, finished=start + chunk >= len(ids)))
    return deltas


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_stop_string_cuts_the_text(tokenizers: dict, arch: str) -> None:
    tokenizer = tokenizers[arch]
    ids = tokenizer("The cat sat. The dog ran.", add_special_tokens=False)["input_ids"]
    assert candidate_text(tokenizer, ids, ["."]) == "The cat sat"
    assert candidate_text(tokenizer, ids, ["dog", "sat"]) == "The cat "
    assert candidate_text(tokenizer, ids, []) == "The cat sat. The dog ran."


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_stream_never_sends_a_stop_prefix(tokenizers: dict, arch: str) -> None:
    tokenizer = tokenizers[arch]
    ids = tokenizer("ab ab abc", add_special_tokens=False)["input_ids"]
    deltas = stream(tokenizer, ids, ["abc"])
    assert "".join(deltas) == candidate_text(tokenizer, ids, ["abc"]) == "ab ab "


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_text_token_count_leaves_out_the_ids_that_only_completed_a_stop_string(
    tokenizers: dict, arch: str
) -> None:
    tokenizer = tokenizers[arch]
    ids = tokenizer("The cat sat.\n\nQuestion: why?", add_special_tokens=False)["input_ids"]
    stop = ["\n\nQuestion:"]
    text = candidate_text(tokenizer, ids, stop)
    assert text == "The cat sat."
    count = text_token_count(tokenizer, ids, stop)
    assert count < len(ids)
    shown = candidate_text(tokenizer, ids[:count], ())
    assert shown.startswith(text) and not candidate_text(tokenizer, ids[: count - 1], ()).startswith(text)
    assert "Question" not in shown  # the stop string's tokens are left out
    assert text_token_count(tokenizer, ids, []) == len(ids)  # no cut: every id counts
    streamed = StreamedText(tokenizer, stop)
    streamed.push(ids, finished=True)
    assert streamed.text_token_count() == count


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30),
       chunk=st.integers(1, 4), stop=st.lists(st.text(min_size=1, max_size=3), max_size=2))  # fmt: skip
def test_streamed_deltas_concatenate_to_the_unary_text(
    tokenizers: dict, text: str, chunk: int, stop: list
) -> None:
    for tokenizer in tokenizers.values():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert "".join(stream(tokenizer, ids, stop, chunk)) == candidate_text(tokenizer, ids, stop)


def test_byte_fallback_runs_are_held_back(tokenizers: dict) -> None:
    """A run of <0xNN> tokens is only sent once it ends: a later invalid byte may rewrite it."""
    tokenizer = tokenizers["llama"]
    pieces = [f"<0x{b:02X}>" for b in "é".encode()] + ["<0x80>"]
    ids = tokenizer.convert_tokens_to_ids(pieces)
    deltas = stream(tokenizer, ids, [])
    assert deltas[:-1] == ["", ""] and "".join(deltas) == candidate_text(tokenizer, ids, [])


def test_vllm_backend_is_never_chosen_silently(monkeypatch: pytest.MonkeyPatch) -> None:
    from inference_server.backends import vllm_backend

    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a host where vLLM is not installed
    with pytest.raises(RuntimeError, match="--backend transformers"):
        vllm_backend.require_vllm()
