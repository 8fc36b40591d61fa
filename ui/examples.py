"""Pre-loaded examples: a JSONL file users can extend, and uploads of the user's own JSONL sets.

One JSON object per line (blank lines and lines starting with ``//`` are skipped)::

    {"id": "quiche", "title": "Quiche Lorraine", "prompt": "...", "target": "...",
     "foil": "...", "granularity": "sentences", "stop": ["\\n\\n"]}

Fields: ``id`` (unique, letters/digits/``-_.``), ``title`` and ``prompt`` are required;
``target`` (a reference target), ``foil`` (a contrastive alternative), ``granularity``
(tokens, words, sentences, lines, paragraphs or custom_regex), ``regex`` (with custom_regex),
``stop`` (list of stop strings), ``chat_template`` (bool), ``max_new_tokens`` (int) and
``description`` are optional. Any other field is reported, so a typo does not go unnoticed.
A bad line is skipped with a message naming the source, the line and what to fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ui.state import MAX_NEW_TOKENS_LIMIT, SideState, TargetKind, parse_granularity

EXAMPLES_PATH = Path(__file__).resolve().parent / "examples.jsonl"

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,79}$")
_REQUIRED = ("id", "title", "prompt")
_OPTIONAL = (
    "target",
    "foil",
    "granularity",
    "regex",
    "stop",
    "chat_template",
    "max_new_tokens",
    "description",
)


@dataclass(frozen=True)
class Example:
    """One pre-loaded datapoint."""

    id: str
    title: str
    prompt: str
    target: str = ""
    foil: str = ""
    #: Granularity enum name, or "" for the current one.
    granularity: str = ""
    regex: str = ""
    stop: tuple[str, ...] = ()
    chat_template: bool | None = None
    max_new_tokens: int | None = None
    description: str = ""
    #: Where it was loaded from (file name), for the data table.
    source: str = ""


class ExampleError(ValueError):
    """A line that is not a valid example; the message names the source and line."""


def parse_example(row: Any, *, source: str = "", line: int = 0) -> Example:
    """An :class:`Example` from a decoded JSON value; :class:`ExampleError` saying what is wrong."""
    where = f"{source}, line {line}" if source else f"line {line}"

    def fail(problem: str) -> ExampleError:
        return ExampleError(f"{where}: {problem}")

    if not isinstance(row, dict):
        raise fail(f"expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise fail(
            f"unknown field(s) {', '.join(map(repr, unknown))}; "
            f"known fields are {', '.join(_REQUIRED + _OPTIONAL)}"
        )
    for name in _REQUIRED:
        if name not in row:
            raise fail(f'missing required field "{name}"')
    for name in ("id", "title", "prompt", "target", "foil", "granularity", "regex", "description"):
        if name in row and not isinstance(row[name], str):
            raise fail(f'"{name}" must be a string, got {type(row[name]).__name__}')
    if not _ID.match(row["id"]):
        raise fail(f'"id" {row["id"]!r} must be 1-80 letters, digits, "-", "_" or ".", starting alphanumeric')
    if not row["prompt"]:
        raise fail('"prompt" is empty')
    granularity = ""
    if row.get("granularity"):
        try:
            granularity = parse_granularity(row["granularity"])
        except ValueError as exc:
            raise fail(str(exc)) from None
    if granularity == "CUSTOM_REGEX":
        from seqsal.errors import InvalidArgumentError
        from seqsal.segmentation import validate_regex

        try:
            validate_regex(row.get("regex", ""))
        except InvalidArgumentError as exc:
            raise fail(str(exc)) from None
    stop = row.get("stop", [])
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise fail('"stop" must be a list of non-empty strings')
    chat = row.get("chat_template")
    if chat is not None and not isinstance(chat, bool):
        raise fail('"chat_template" must be true or false')
    max_new = row.get("max_new_tokens")
    if max_new is not None and not (
        isinstance(max_new, int) and not isinstance(max_new, bool) and 1 <= max_new <= MAX_NEW_TOKENS_LIMIT
    ):
        raise fail(f'"max_new_tokens" must be a whole number from 1 to {MAX_NEW_TOKENS_LIMIT}')
    return Example(
        id=row["id"],
        title=row["title"].strip() or row["id"],
        prompt=row["prompt"],
        target=row.get("target", ""),
        foil=row.get("foil", ""),
        granularity=granularity,
        regex=row.get("regex", ""),
        stop=tuple(stop),
        chat_template=chat,
        max_new_tokens=max_new,
        description=row.get("description", ""),
        source=source,
    )


def parse_jsonl(
    text: str, *, source: str = "", known_ids: Iterable[str] = ()
) -> tuple[list[Example], list[str]]:
    """The valid examples of a JSONL text and one message per bad line (those lines are skipped).

    Ids must be unique within the text and not among ``known_ids`` (already loaded examples).
    """
    examples: list[Example] = []
    problems: list[str] = []
    seen = set(known_ids)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("//"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            where = f"{source}, line {number}" if source else f"line {number}"
            problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        try:
            example = parse_example(row, source=source, line=number)
        except ExampleError as exc:
            problems.append(str(exc))
            continue
        if example.id in seen:
            where = f"{source}, line {number}" if source else f"line {number}"
            problems.append(f'{where}: id "{example.id}" is already used; give this example another id')
            continue
        seen.add(example.id)
        examples.append(example)
    return examples, problems


def load_examples(path: Path = EXAMPLES_PATH) -> tuple[list[Example], list[str]]:
    """The examples of a JSONL file, and messages for its bad lines (or for a missing file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return [], [f"could not read the examples file {path}: {exc.strerror or exc}"]
    except UnicodeDecodeError:
        return [], [f"the examples file {path} is not UTF-8 text"]
    return parse_jsonl(text, source=path.name)


def decode_upload(data: bytes, name: str, known_ids: Iterable[str]) -> tuple[list[Example], list[str]]:
    """Examples from an uploaded JSONL file's bytes (same rules as the bundled file)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return [], [f"{name}: not UTF-8 text; save the file as UTF-8 JSONL (one JSON object per line)"]
    examples, problems = parse_jsonl(text, source=name, known_ids=known_ids)
    if not examples and not problems:
        problems.append(f"{name}: no examples found (expected one JSON object per line)")
    return examples, problems


def side_for_example(example: Example, base: SideState) -> SideState:
    """``base`` with the example loaded: prompt, target choice, foil and its preferred settings.

    With a reference ``target`` the view explains it (target kind "reference"); otherwise the
    generated response. A ``foil`` is filled in for the contrastive mode. The selection is cleared.
    What belongs to the example (target, foil, stop strings, max new tokens) never carries over
    from the previous one: an example without ``max_new_tokens`` gets the default.
    """
    kind: TargetKind = "reference" if example.target else "candidate"
    return replace(
        base,
        example_id=example.id,
        prompt=example.prompt,
        target_kind=kind,
        reference=example.target,
        foil=example.foil,
        selection=(),
        candidate=0,
        granularity=example.granularity or base.granularity,
        regex=example.regex if example.granularity == "CUSTOM_REGEX" else base.regex,
        stop=example.stop,
        chat_template=base.chat_template if example.chat_template is None else example.chat_template,
        max_new_tokens=example.max_new_tokens or SideState().max_new_tokens,
    )


def baselines(examples: Iterable[Example]) -> dict[str, SideState]:
    """Example id -> the side loading it into a default view gives (what links are relative to)."""
    return {e.id: side_for_example(e, SideState()) for e in examples}
