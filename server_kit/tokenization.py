"""One tokenisation per model, with char offsets, used by every service.

A prompt is tokenised with the tokenizer's own special tokens (BOS...); a
target or foil on its own, without them. Returned tokens *tile* their text:
each non-special token starts where the previous one ended, so whitespace is
kept on the token that follows it and the token texts concatenate back to the
input. Special tokens get an empty char span at their position and their
literal form as text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from seqsal.errors import InvalidArgumentError
from seqsal.v1 import common_pb2

REPLACEMENT_CHAR = "\ufffd"


def _tile(
    text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]], special: Sequence[int], part: int
) -> list[common_pb2.Token]:
    """Turn tokenizer offsets into tiled tokens covering ``text`` exactly."""
    last_regular = max((i for i, s in enumerate(special) if not s), default=-1)
    tokens: list[common_pb2.Token] = []
    cursor = 0
    for i, (token_id, (_, end), is_special) in enumerate(zip(ids, offsets, special, strict=True)):
        if is_special:
            tokens.append(
                common_pb2.Token(id=token_id, text="", start=cursor, end=cursor, special=True, part=part)
            )
            continue
        stop = len(text) if i == last_regular else min(max(end, cursor), len(text))
        tokens.append(
            common_pb2.Token(
                id=token_id, text=text[cursor:stop], start=cursor, end=stop, special=False, part=part
            )
        )
        cursor = stop
    return tokens


def tokenize(tokenizer: Any, text: str, *, part: int, add_special_tokens: bool) -> list[common_pb2.Token]:
    """Tokenise ``text`` as the servers do, with tiled char offsets.

    ``tokenizer`` must be a fast (Rust) Hugging Face tokenizer: offsets come
    from it, so no re-tokenisation drift is possible.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidArgumentError(
            "the model's tokenizer is not a fast tokenizer, so it cannot report char offsets; "
            "save the model with a tokenizer.json",
            field="model",
        )
    enc = tokenizer(
        text,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    ids = list(enc["input_ids"])
    special = list(enc["special_tokens_mask"]) if add_special_tokens else [0] * len(ids)
    tokens = _tile(text, ids, enc["offset_mapping"], special, part)
    for token in tokens:
        if token.special:
            token.text = tokenizer.convert_ids_to_tokens(token.id)
    return tokens


def tokens_from_ids(
    tokenizer: Any, ids: Sequence[int], *, part: int, field: str, context_ids: Sequence[int] = ()
) -> list[common_pb2.Token]:
    """Tokens for given ids (e.g. from Generate); the part's text is their decoding.

    ``context_ids`` (e.g. the prompt's last token) are decoded in front and cut
    off again, so that a continuation keeps its leading space: SentencePiece
    decoders drop the space of a sequence's first token ("▁Paris" alone decodes
    to "Paris", after "▁is" to " Paris").

    Each token's text is what it adds to the incremental decoding, so the
    texts concatenate to ``tokenizer.decode(ids)``. A token that ends in the
    middle of a multi-byte character gets empty text; the character goes to
    the token that completes it. Where the decoder rewrites earlier text (byte
    fallback decodes an invalid byte run as U+FFFD per byte), the token that
    causes it takes the rewritten text from the earlier tokens.
    """
    vocab_size = len(tokenizer)
    for i, token_id in enumerate(ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidArgumentError(
                f"{field}[{i}] = {token_id} is not a token id of this model (vocabulary size {vocab_size})",
                field=field,
            )
    special_ids = set(tokenizer.all_special_ids)
    context = [i for i in context_ids if i not in special_ids]
    prefix = tokenizer.decode(context, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def decode(upto: int) -> str:
        text = tokenizer.decode(
            context + list(ids[:upto]), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        if text.startswith(prefix):
            return text[len(prefix) :]
        return tokenizer.decode(
            list(ids[:upto]), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    tokens: list[common_pb2.Token] = []
    committed = ""
    for k, token_id in enumerate(ids):
        start = len(committed)
        if token_id in special_ids:
            literal = tokenizer.convert_ids_to_tokens(token_id)
            tokens.append(
                common_pb2.Token(id=token_id, text=literal, start=start, end=start, special=True, part=part)
            )
            continue
        decoded = decode(k + 1)
        if decoded.endswith(REPLACEMENT_CHAR) and k + 1 < len(ids):
            piece = ""
        elif decoded.startswith(committed):
            piece = decoded[len(committed) :]
        else:
            # The decoder rewrote earlier text: byte fallback turns a whole run of byte tokens that
            # is not valid UTF-8 into U+FFFD, one per byte, including bytes already committed as
            # valid chars. Earlier tokens give back what they claimed past the common prefix; this
            # token takes the rewritten rest, so the texts still concatenate to the decoding.
            keep = next(
                (i for i, (a, b) in enumerate(zip(committed, decoded, strict=False)) if a != b),
                min(len(committed), len(decoded)),
            )
            for earlier in tokens:
                if earlier.end > keep:
                    earlier.start = min(earlier.start, keep)
                    earlier.end = keep
                    if not earlier.special:
                        earlier.text = committed[earlier.start : keep]
            committed = committed[:keep]
            start = keep
            piece = decoded[keep:]
        committed += piece
        tokens.append(
            common_pb2.Token(
                id=token_id, text=piece, start=start, end=start + len(piece), special=False, part=part
            )
        )
    return tokens


def prompt_tokens_from_ids(tokenizer: Any, ids: Sequence[int], *, field: str) -> list[common_pb2.Token]:
    """Tokens for given prompt ids, used as given: :func:`tokens_from_ids`, or, when tokenising
    their decoding as a prompt gives exactly these ids and special tokens, that tokenisation
    (the same tokens a text prompt gets, with the tokenizer's offsets, in linear time: decoding
    token by token costs time quadratic in the length)."""
    vocab_size = len(tokenizer)
    if ids and all(0 <= i < vocab_size for i in ids):
        special_ids = set(tokenizer.all_special_ids)
        text = tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        again = tokenize(tokenizer, text, part=common_pb2.PROMPT, add_special_tokens=True)
        if [t.id for t in again] == list(ids) and all(t.special == (t.id in special_ids) for t in again):
            return again
    return tokens_from_ids(tokenizer, ids, part=common_pb2.PROMPT, field=field)


def part_text(tokens: Sequence[common_pb2.Token]) -> str:
    """The text of one part: its non-special tokens' texts concatenated."""
    return "".join(t.text for t in tokens if not t.special)


def longest_token_chars(tokenizer: Any) -> int:
    """The most chars any single token of the vocabulary decodes to (computed once per tokenizer)."""
    cached = getattr(tokenizer, "_seqsal_longest_token_chars", None)
    if cached is None:
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        cached = max((len(tokenizer.convert_tokens_to_string([p])) for p in pieces if p), default=1)
        cached = max(int(cached), 1)
        tokenizer._seqsal_longest_token_chars = cached
    return int(cached)


def surely_too_long(tokenizer: Any, chars: int, limit: int) -> bool:
    """True when a text of ``chars`` chars cannot fit in ``limit`` tokens, whatever its content.

    Lets servers refuse a multi-megabyte prompt at once instead of tokenising it first.
    """
    return chars > limit * longest_token_chars(tokenizer)


@dataclass(frozen=True)
class ContextLimit:
    """The context-length rule of both servers: how many tokens a request may use with one model.

    Args:
        model: the model's id (named in the refusal).
        tokens: the limit.
        setting: what sets the limit on this server (named in the refusal).
        tokenizer: the model's tokenizer (for texts not tokenised yet).
    """

    model: str
    tokens: int
    setting: str
    tokenizer: Any

    def check(self, what: str, field: str, *, tokens: int = 0, chars: int = 0, room: int = 0) -> None:
        """Refuse ``what`` unless it fits in the limit with ``room`` tokens to spare (for an answer).

        ``what`` is ``tokens`` tokens already counted plus, with ``chars``, a text not tokenised
        yet, refused only when it cannot fit whatever its content (:func:`surely_too_long`), so that
        a multi-megabyte text is refused before it is tokenised. Raises InvalidArgumentError naming
        ``field``, the size, the limit and the setting.
        """
        budget = self.tokens - room
        over = surely_too_long(self.tokenizer, chars, budget - tokens) if chars else tokens > budget
        if not over:
            return
        size = " + ".join(f"{n} {unit}" for n, unit in ((tokens, "tokens"), (chars, "chars")) if n)
        spare = f", less {room} for the answer" if room else ""
        raise InvalidArgumentError(
            f"{what} is {size}, over the {self.tokens}-token context of model {self.model!r} on this "
            f"server ({self.setting}){spare}; shorten {field}",
            field=field,
        )
