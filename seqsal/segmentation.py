"""Group tokens into segments: the one segmentation used by the servers and the UI.

Input is the token list of a response (``seqsal.v1.common_pb2.Token``): the PROMPT
tokens, then the TARGET tokens, then possibly the FOIL tokens. Within a part the
non-special tokens tile the part's text (the first starts at 0, each starts where
the previous one ended, ``text == part_text[start:end]``), so the part text is the
concatenation of their texts. Special tokens (BOS, ...) carry their literal form
(``"<s>"``) as ``text``, cover no chars and are not part of the part text.

A segment is a half-open run ``[token_start, token_end)`` of tokens. The segments of
a granularity partition the token list: they are contiguous, non-empty, cover every
token exactly once and never cross a part boundary. A token *starts a segment* when

* it is the first token of its part;
* it is special, or it follows a special token (a special token is always a
  segment of its own);
* it is the first token of a *chat-template marker*, or it follows the last one (a
  marker is always a segment of its own, see below);
* the granularity's rule says so:

  - ``TOKENS``: every token.
  - ``WORDS``: it is non-empty and its text begins with whitespace or ``'▁'``
    (U+2581, the SentencePiece space), or the nearest preceding non-empty token of
    its part ends with ``'\\n'``.
  - ``SENTENCES``, ``LINES``, ``PARAGRAPHS``, ``CUSTOM_REGEX``: it holds a char
    *boundary* of its part text (below).

Char boundaries are positions in the part text. Boundary ``b`` makes the token whose
char span ``[start, end)`` contains ``b`` start a segment: a boundary inside a token
makes the whole token start the new segment. Boundaries at 0 or at ``len(text)`` are
no-ops (the part's first token already starts a segment; nothing follows the last).
Empty non-special tokens contain no char, so they never hold a boundary and stay in
the segment before them. Throughout, "space" means whitespace other than ``'\\n'``,
or ``'▁'``.

* ``LINES``: right after every run of ``'\\n'``: the newlines end the previous line.
  ``"\\r\\n"`` works the same (the ``'\\r'`` stays before its ``'\\n'``).
* ``SENTENCES``: every ``LINES`` boundary, plus, after each of ``.``, ``?`` or ``!``
  followed by a run of spaces that is followed by a non-space char, a boundary at
  the start of that run: the space goes with the next sentence, as tokenizers put
  leading spaces on the next token. A run that reaches a ``'\\n'`` or the end of the
  text gives no boundary of its own (the newline rule splits it; trailing spaces
  stay with the last sentence).
* ``PARAGRAPHS``: right after the last ``'\\n'`` of every blank-line run, i.e. every
  match of ``\\n(?:[spaces]*\\n)+``: two or more newlines with only spaces between
  them (``"\\n\\n"``, ``"\\n\\n\\n"``, ``"\\n  \\n"``, ``"\\r\\n\\r\\n"``). Indentation
  of the next paragraph's first line goes with that paragraph.
* ``CUSTOM_REGEX``: at the start of every match of the pattern in the part text, found
  left to right as ``finditer`` does. Applies to every part. The pattern is RE2 syntax
  (https://github.com/google/re2/wiki/Syntax), matched in time linear in the text, so
  no pattern can stall the server: no backreferences (``\\1``) or lookaround
  (``(?=``, ``(?!``, ``(?<=``, ``(?<!``); ``\\w``, ``\\d``, ``\\s`` and ``\\b`` are
  ASCII (use ``\\pL``, ``\\pN``, ``[[:space:]]`` for other scripts); no flags are
  added, use inline flags such as ``(?m)`` or ``(?i)``; ``$`` without ``(?m)`` matches only
  at the very end (Python's ``re`` also matches before a final ``'\\n'``). Zero-width matches of anchors
  (``(?m)^``, ``\\b``, ``$``) start a segment at their position. The pattern must be
  non-empty, at most :data:`MAX_REGEX_CHARS` chars, compile, and not match the empty
  string everywhere (``x*``, ``a?``, ``(|b)``: it would start a segment at every char,
  which is ``TOKENS``) or inside a word (``\\B``, ``x*\\B``: a segment would start inside every
  word); zero-width matches of ``^``, ``$`` and ``\\b`` never fall inside a word.

**Chat-template markers** are the literal turn markers a chat template writes into the
prompt text: every match of :data:`TEMPLATE_MARKER` (``<|im_start|>``, ``<|im_end|>``,
``<|user|>``, ``<|eot_id|>``, ``<start_of_turn>``, ``<end_of_turn>``, ``[INST]``,
``[/INST]``, ``<<SYS>>``...) in a part text. Tokenizers do not flag them as special (they
are text of the prompt, and may even be split into several tokens), so this module does:
the tokens that overlap a marker's chars form a segment of their own at every granularity
(so ``"Face<|im_end|>"`` is two segments), and :func:`template_markers` flags them, so that
renderers treat them like special tokens (dimmed, out of the colour range by default:
:mod:`seqsal.scale`). :func:`template_tokens` also finds the rest of the template around
the user's own text (roles, the template's built-in system prompt).

``GRANULARITY_UNSPECIFIED`` gives no segments. A segment's ``char_start``/``char_end``
are the char span of its tokens in the part text (``char_start == char_end`` at the
special token's position for a special segment) and its ``text`` is the
concatenation of its token texts (the literal form for a special token), so for
non-special segments ``text == part_text[char_start:char_end]``.

Tokens that break the tiling contract raise ``ValueError`` (a server bug, not a bad
request); a bad granularity or regex raises ``InvalidArgumentError``.
"""

from __future__ import annotations

import itertools
import re
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import Protocol

import re2

from seqsal.errors import InvalidArgumentError, quote
from seqsal.segment_scores import with_scores  # noqa: F401  (segmentation.with_scores, as before)
from seqsal.v1 import common_pb2

SPACE_CHARS = "\u2581"
"""Chars treated as spaces besides Python whitespace (the SentencePiece space)."""

_SPACE = r"(?:[^\S\n]|\u2581)"
_LINE_END = re.compile(r"\n+")
_SENTENCE_END = re.compile(rf"[.?!]({_SPACE}+)(?=[^\s\u2581])")
_PARAGRAPH_END = re.compile(rf"\n(?:{_SPACE}*\n)+")

TEMPLATE_MARKER = re.compile(r"<\|[A-Za-z0-9_.:-]{1,40}\|>|<(?:start|end)_of_turn>|\[/?INST\]|<</?SYS>>")
"""A chat-template marker in a part text (see the module docstring)."""

_CHAR_GRANULARITIES = frozenset(
    {
        common_pb2.SENTENCES,
        common_pb2.LINES,
        common_pb2.PARAGRAPHS,
        common_pb2.CUSTOM_REGEX,
    }
)
_KNOWN_GRANULARITIES = _CHAR_GRANULARITIES | {
    common_pb2.GRANULARITY_UNSPECIFIED,
    common_pb2.TOKENS,
    common_pb2.WORDS,
}


SEGMENTATION_VERSION = 2
"""Bumped when the rules change what segments a request gives (2: chat-template markers), so
results keyed by segments (occlusion, LIME) cached under the old rules are never served."""

MAX_REGEX_CHARS = 1000
"""Longest ``custom_regex`` accepted."""

REGEX_SYNTAX = (
    "custom_regex uses RE2 syntax (https://github.com/google/re2/wiki/Syntax), which always runs in "
    "linear time: no backreferences (\\1) or lookaround ((?=, (?!, (?<=, (?<!); anchor with ^, $, \\b "
    "and inline flags such as (?m) or (?i), or match the text itself"
)
"""What every ``custom_regex`` error says about the supported syntax and the fix."""

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # errors become InvalidArgumentError, not stderr noise

# Every context an empty match can depend on (RE2's ^ $ \b \B \A \z look only at the chars
# either side): (text, position) for each pair of (start | word | other | newline) before and
# (end | word | other | newline) after.
_EMPTY_CONTEXTS = tuple(
    (before + after, len(before)) for before in ("", "a", " ", "\n") for after in ("", "a", " ", "\n")
)


class RegexMatch(Protocol):
    """The part of a match this module uses."""

    def start(self) -> int: ...


class CompiledRegex(Protocol):
    """A compiled ``custom_regex`` (an RE2 pattern)."""

    @property
    def pattern(self) -> str: ...

    def finditer(self, text: str) -> Iterator[RegexMatch]: ...

    def fullmatch(
        self, text: str, pos: int | None = None, endpos: int | None = None
    ) -> RegexMatch | None: ...


def _re2_message(exc: Exception) -> str:
    """RE2's error text (the binding gives bytes)."""
    arg = exc.args[0] if exc.args else exc
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def validate_regex(pattern: str) -> CompiledRegex:
    """Compile a ``custom_regex`` with RE2; raise ``InvalidArgumentError`` naming it if it is bad.

    Rejected: an empty pattern (``CUSTOM_REGEX`` needs something to match), one longer than
    :data:`MAX_REGEX_CHARS`, one RE2 cannot compile (invalid, or unsupported such as
    backreferences and lookaround), one that matches the empty string in every context, and one
    that matches it inside a word (between two letters): both would give segments like ``TOKENS``.
    The UI and the servers both call this, so they accept and mean the same patterns.
    """
    if not pattern:
        raise InvalidArgumentError(
            "custom_regex is required with granularity CUSTOM_REGEX: give a pattern whose every match "
            r"starts a segment, e.g. (?m)^\w+: or \*\*, or pick another granularity",
            field="custom_regex",
        )
    if len(pattern) > MAX_REGEX_CHARS:
        raise InvalidArgumentError(
            f"custom_regex is {len(pattern)} chars; at most {MAX_REGEX_CHARS} are accepted, shorten it",
            field="custom_regex",
        )
    try:
        compiled: CompiledRegex = re2.compile(pattern, _RE2_OPTIONS)
    except (re2.error, ValueError, UnicodeError) as exc:
        raise InvalidArgumentError(
            f"custom_regex {quote(pattern)} is not a valid RE2 pattern: {_re2_message(exc)}. {REGEX_SYNTAX}",
            field="custom_regex",
        ) from exc
    if all(compiled.fullmatch(text, pos, pos) is not None for text, pos in _EMPTY_CONTEXTS):
        raise InvalidArgumentError(
            f"custom_regex {quote(pattern)} matches the empty string everywhere, so it would start a segment "
            "at every char (that is granularity TOKENS); make it match at least one char "
            "(e.g. x+ instead of x*) or anchor it (e.g. (?m)^ or \\b)",
            field="custom_regex",
        )
    if compiled.fullmatch("ab", 1, 1) is not None:
        raise InvalidArgumentError(
            f"custom_regex {quote(pattern)} matches the empty string inside words (between the two letters "
            "of 'ab'), so it would start a segment inside every word, which is granularity TOKENS; make it "
            "match at least one char, or anchor it at word boundaries (\\b) or line starts ((?m)^)",
            field="custom_regex",
        )
    return compiled


def part_runs(tokens: Sequence[common_pb2.Token]) -> list[tuple[int, int, int]]:
    """The parts of ``tokens`` as ``(part, first, end)`` token index runs, in order.

    Raises ``ValueError`` if a part appears in two separate runs.
    """
    runs: list[tuple[int, int, int]] = []
    first = 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or tokens[i].part != tokens[first].part:
            part = int(tokens[first].part)
            if any(run[0] == part for run in runs):
                raise ValueError(f"tokens of part {_part_name(part)} are not contiguous (index {first})")
            runs.append((part, first, i))
            first = i
    return runs


def _part_name(part: int) -> str:
    """The enum name of a part, or its number if unknown."""
    try:
        return common_pb2.Part.Name(part)  # type: ignore[arg-type]
    except ValueError:
        return str(part)


def _char_offsets(tokens: Sequence[common_pb2.Token], first: int, end: int) -> list[int]:
    """Char position of every token of one part run: its ``start``, or the running offset for specials.

    Checks the tiling contract of the non-special tokens and raises ``ValueError`` if broken.
    """
    offsets: list[int] = []
    pos = 0
    for i in range(first, end):
        token = tokens[i]
        offsets.append(pos)
        if token.special:
            continue
        if token.start != pos or token.end != pos + len(token.text):
            raise ValueError(
                f"token {i} ({token.text!r}, [{token.start}, {token.end})) does not tile its part text: "
                f"expected start {pos} and end {pos + len(token.text)}"
            )
        pos = token.end
    return offsets


def part_texts(tokens: Sequence[common_pb2.Token]) -> dict[int, str]:
    """Each part's text (part enum value -> text), rebuilt from its non-special tokens.

    Raises ``ValueError`` if the tokens break the tiling contract.
    """
    texts: dict[int, str] = {}
    for part, first, end in part_runs(tokens):
        _char_offsets(tokens, first, end)
        texts[part] = "".join(t.text for t in tokens[first:end] if not t.special)
    return texts


def char_boundaries(text: str, granularity: int, pattern: CompiledRegex | None = None) -> set[int]:
    """Char boundaries of a part text for a char-based granularity (see the module docstring).

    ``pattern`` is required for ``CUSTOM_REGEX``. The result may include 0 and ``len(text)``.
    """
    if granularity == common_pb2.LINES:
        return {m.end() for m in _LINE_END.finditer(text)}
    if granularity == common_pb2.SENTENCES:
        lines = char_boundaries(text, common_pb2.LINES)
        return lines | {m.start(1) for m in _SENTENCE_END.finditer(text)}
    if granularity == common_pb2.PARAGRAPHS:
        return {m.end() for m in _PARAGRAPH_END.finditer(text)}
    if granularity == common_pb2.CUSTOM_REGEX:
        if pattern is None:
            raise ValueError("CUSTOM_REGEX needs a compiled pattern")
        return {m.start() for m in pattern.finditer(text)}
    raise ValueError(f"granularity {granularity} has no char boundaries")


def _is_word_start(text: str) -> bool:
    """True if a token text begins with whitespace or the SentencePiece space."""
    return bool(text) and (text[0].isspace() or text[0] in SPACE_CHARS)


def _word_starts(tokens: Sequence[common_pb2.Token], first: int, end: int) -> list[bool]:
    """WORDS rule for one part run: which tokens start a word."""
    starts: list[bool] = []
    after_newline = False
    for token in tokens[first:end]:
        starts.append(bool(token.text) and (_is_word_start(token.text) or after_newline))
        if token.text and not token.special:
            after_newline = token.text.endswith("\n")
    return starts


def _boundary_starts(
    tokens: Sequence[common_pb2.Token],
    first: int,
    end: int,
    offsets: Sequence[int],
    boundaries: set[int],
) -> list[bool]:
    """Char-boundary rule for one part run: which tokens contain a boundary char."""
    starts = [False] * (end - first)
    # Non-empty non-special tokens in order: their char starts are sorted and they tile the text.
    holders = [j for j in range(end - first) if not tokens[first + j].special and tokens[first + j].text]
    holder_starts = [offsets[j] for j in holders]
    text_len = tokens[first + holders[-1]].end if holders else 0
    for b in boundaries:
        if 0 < b < text_len:
            starts[holders[bisect_right(holder_starts, b) - 1]] = True
    return starts


def _marker_spans(tokens: Sequence[common_pb2.Token], first: int, end: int) -> list[tuple[int, int]]:
    """Token runs ``[a, b)`` (absolute indices) of one part run that overlap a chat-template marker."""
    text = "".join(t.text for t in tokens[first:end] if not t.special)
    if "<" not in text and "[" not in text:
        return []
    holders = [i for i in range(first, end) if not tokens[i].special and tokens[i].text]
    starts = [tokens[i].start for i in holders]
    spans: list[tuple[int, int]] = []
    for m in TEMPLATE_MARKER.finditer(text):
        lo = holders[bisect_right(starts, m.start()) - 1]  # the token holding the first char
        hi = holders[bisect_right(starts, m.end() - 1) - 1]  # ... and the last one
        spans.append((lo, hi + 1))
    return spans


def template_markers(tokens: Sequence[common_pb2.Token]) -> list[bool]:
    """Per token: True when it overlaps a chat-template marker (own segment, dimmed, scaled as special)."""
    flags = [False] * len(tokens)
    for _, first, end in part_runs(tokens):
        for a, b in _marker_spans(tokens, first, end):
            flags[a:b] = [True] * (b - a)
    return flags


def special_flags(tokens: Sequence[common_pb2.Token]) -> list[bool]:
    """Per token: special for the colour scale: a special token (BOS, EOS...) or a chat-template marker."""
    return [bool(t.special) or m for t, m in zip(tokens, template_markers(tokens), strict=True)]


def template_tokens(tokens: Sequence[common_pb2.Token], user_text: str) -> list[bool]:
    """Per token: True for the chat template around the user's own text in the prompt.

    That is every PROMPT token (special ones included) outside the last occurrence of
    ``user_text`` in the prompt text, and every chat-template marker: the template's roles,
    markers and built-in system prompt. When ``user_text`` is empty or not in the prompt
    text, only the markers (and special tokens) are.
    """
    flags = special_flags(tokens)
    prompt = "".join(t.text for t in tokens if t.part == common_pb2.PROMPT and not t.special)
    at = prompt.rfind(user_text) if user_text else -1
    if at < 0:
        return flags
    stop = at + len(user_text)
    for i, t in enumerate(tokens):
        if t.part == common_pb2.PROMPT and not flags[i] and (t.special or t.end <= at or t.start >= stop):
            flags[i] = True
    return flags


def _segment_starts(
    tokens: Sequence[common_pb2.Token],
    first: int,
    end: int,
    offsets: Sequence[int],
    granularity: int,
    pattern: CompiledRegex | None,
) -> list[bool]:
    """For one part run, which tokens start a segment (all rules combined)."""
    if granularity == common_pb2.TOKENS:
        return [True] * (end - first)
    if granularity == common_pb2.WORDS:
        starts = _word_starts(tokens, first, end)
    else:
        text = "".join(t.text for t in tokens[first:end] if not t.special)
        starts = _boundary_starts(tokens, first, end, offsets, char_boundaries(text, granularity, pattern))
    starts[0] = True
    for a, b in _marker_spans(tokens, first, end):
        starts[a - first] = True
        if b < end:
            starts[b - first] = True
    for j in range(end - first):
        if tokens[first + j].special:
            starts[j] = True
            if j + 1 < end - first:
                starts[j + 1] = True
    return starts


def _make_segment(
    tokens: Sequence[common_pb2.Token], part: int, start: int, stop: int, char_start: int
) -> common_pb2.Segment:
    """A segment of tokens ``[start, stop)`` of one part, starting at ``char_start`` in its text."""
    text = "".join(t.text for t in tokens[start:stop])
    char_len = sum(len(t.text) for t in tokens[start:stop] if not t.special)
    return common_pb2.Segment(
        part=part,  # type: ignore[arg-type]
        token_start=start,
        token_end=stop,
        char_start=char_start,
        char_end=char_start + char_len,
        text=text,
    )


def _check_granularity(granularity: int) -> None:
    """Raise ``InvalidArgumentError`` for a granularity this module does not know."""
    if granularity not in _KNOWN_GRANULARITIES:
        raise InvalidArgumentError(f"unknown granularity {granularity}", field="granularity")


def segment_tokens(
    tokens: Sequence[common_pb2.Token], granularity: int, custom_regex: str = ""
) -> list[common_pb2.Segment]:
    """Segments of all parts at ``granularity``, in token order, with empty ``scores``.

    ``custom_regex`` is used (and validated) only with ``CUSTOM_REGEX``.
    ``GRANULARITY_UNSPECIFIED`` gives ``[]``. Raises ``InvalidArgumentError`` for an unknown
    granularity or a bad regex, ``ValueError`` for tokens that break the tiling contract.
    """
    _check_granularity(granularity)
    pattern = validate_regex(custom_regex) if granularity == common_pb2.CUSTOM_REGEX else None
    if granularity == common_pb2.GRANULARITY_UNSPECIFIED:
        return []
    segments: list[common_pb2.Segment] = []
    for part, first, end in part_runs(tokens):
        offsets = _char_offsets(tokens, first, end)
        starts = _segment_starts(tokens, first, end, offsets, granularity, pattern)
        begins = [j for j, s in enumerate(starts) if s] + [end - first]
        for a, b in itertools.pairwise(begins):
            segments.append(_make_segment(tokens, part, first + a, first + b, offsets[a]))
    return segments


def segment_target_masks(
    tokens: Sequence[common_pb2.Token], segments: Sequence[common_pb2.Segment]
) -> list[tuple[common_pb2.Segment, list[bool]]]:
    """For every TARGET segment, in order: the segment and its mask over the TARGET tokens.

    The mask has one bool per TARGET token (in token order), True for the segment's tokens:
    the ``target_mask`` that explains that segment.
    """
    target_indices = [i for i, t in enumerate(tokens) if t.part == common_pb2.TARGET]
    return [
        (segment, [segment.token_start <= i < segment.token_end for i in target_indices])
        for segment in segments
        if segment.part == common_pb2.TARGET
    ]


def segments_overlapping(
    segments: Sequence[common_pb2.Segment], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Indices (in order) of the ``segments`` whose char span overlaps one of ``spans``.

    For carrying a selection over to other segments of the same text (another granularity):
    segments without chars (special tokens) never overlap.
    """
    return [
        i
        for i, s in enumerate(segments)
        if s.char_end > s.char_start and any(s.char_start < b and a < s.char_end for a, b in spans)
    ]
