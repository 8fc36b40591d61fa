"""One definition of a candidate's text, whatever the backend.

``text = decode(token_ids)`` (special tokens skipped), cut at the first
occurrence of any stop string. Backends only report token ids reliably alike
(vLLM's incremental detokenizer and ``tokenizer.decode`` disagree on invalid
byte sequences), so the serving layer derives the text from the ids, for
unary and streamed answers alike. While streaming, text that may still change
is held back: a trailing run of byte-fallback tokens (``<0xNN>``; a decoder may
rewrite the whole run once an invalid byte arrives), a trailing U+FFFD (a
multi-byte char not yet complete) and a trailing piece that could be the start
of a stop string.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def candidate_text(tokenizer: Any, token_ids: Sequence[int], stop: Sequence[str]) -> str:
    """The text of a candidate: its decoded ids up to the first stop string."""
    text = tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    cut = min((i for i in (text.find(s) for s in stop) if i != -1), default=-1)
    return text if cut == -1 else text[:cut]


def text_token_count(tokenizer: Any, token_ids: Sequence[int], stop: Sequence[str]) -> int:
    """How many of ``token_ids`` the candidate's text comes from.

    When a stop string cut the text, the ids after the last one the visible text needs only
    completed the stop string: they are not counted (a token holding both visible text and the
    start of the stop string is). Without a cut every id counts (an EOS included).
    """
    ids = list(token_ids)
    text = candidate_text(tokenizer, ids, stop)
    if text == candidate_text(tokenizer, ids, ()):
        return len(ids)
    count = len(ids)
    while count > 0 and candidate_text(tokenizer, ids[: count - 1], ()).startswith(text):
        count -= 1
    return count


def _pending_stop_prefix(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class StreamedText:
    """Turns a candidate's growing token ids into text deltas that concatenate to its final text."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.byte_tokens: list[bool] = []
        self.emitted = ""

    def push(self, token_ids: Sequence[int], finished: bool) -> str:
        """Add new ids; return the text that is now certain."""
        self.token_ids.extend(token_ids)
        pieces = self.tokenizer.convert_ids_to_tokens(list(token_ids))
        self.byte_tokens.extend(bool(_BYTE_TOKEN.fullmatch(p or "")) for p in pieces)
        certain = len(self.token_ids)
        if not finished:
            while certain and self.byte_tokens[certain - 1]:
                certain -= 1
        text = candidate_text(self.tokenizer, self.token_ids[:certain], self.stop)
        if not finished:
            text = text.rstrip(REPLACEMENT_CHAR)
            text = text[: len(text) - _pending_stop_prefix(text, self.stop)]
        if text.startswith(self.emitted):
            delta = text[len(self.emitted) :]
        else:  # cannot happen with the hold-backs above; never resend what was sent
            delta = text[len(os.path.commonprefix([text, self.emitted])) :]  # noqa: RUF071
        self.emitted += delta
        return delta

    def text_token_count(self) -> int:
        """:func:`text_token_count` of the ids pushed so far (call once the candidate finished)."""
        return text_token_count(self.tokenizer, self.token_ids, self.stop)
