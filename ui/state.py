"""The view state: typed dataclasses, and their round trip through the URL query.

A link reproduces the view for a teammate: the prompt (or the example it came from), the
target choice and selection, method, granularity, regex, model, chat template, generation
settings, display settings, and the pinned side of a side-by-side comparison.

Query keys (values equal to the loaded example's, or to the defaults, are left out, so a link to
an unedited example is just ``?ex=<id>``)::

    ex      example id            prompt  the prompt itself (when short)    ph  prompt hash
    model   model id              chat    1 = chat template                 target  candidate|reference|foil
    cand    candidate index       ref     reference target                  foil    foil text
    sel     selected target segments, e.g. 0,2
    method  grad_l2|grad_dot_input|integrated_gradients
    gran    tokens|words|sentences|lines|paragraphs|custom_regex            re  custom regex (only then)
    n       candidates            max_new  most new tokens   temp  temperature   seed  sampling seed
    stop    JSON list of stop strings
    int     colour intensity      chips   1 = token chips    dense  1 = compact density
    all     1 = the first token and special tokens count in the colour range
    clip    the colour range is this percentile of |score|      agg  sum|mean (segment scores)
    shared  1 = both sides of a side-by-side share one colour range
    tmpl    0 = the chat template around the prompt is left out of the colour range
    pin=1 and the same side keys prefixed with ``pin.`` for the pinned side.

A prompt longer than :data:`MAX_URL_PROMPT_CHARS` is not put in the URL: the link carries the
example id and a hash of the prompt, and opening it shows the example's prompt with a note
when the hashes differ (the prompt had been edited).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from seqsal.scale import AGGREGATES, ScaleRules
from seqsal.v1 import common_pb2

TargetKind = Literal["candidate", "reference", "foil"]

TARGET_KINDS: tuple[TargetKind, ...] = ("candidate", "reference", "foil")
TARGET_KIND_LABELS: dict[TargetKind, str] = {
    "candidate": "Generated response",
    "reference": "Reference target",
    "foil": "Contrastive: target vs. foil",
}

#: Method enum names the UI offers, in display order.
METHODS: tuple[str, ...] = ("GRAD_L2", "GRAD_DOT_INPUT", "INTEGRATED_GRADIENTS", "OCCLUSION", "LIME")
METHOD_LABELS: dict[str, str] = {
    "GRAD_L2": "Gradient L2 norm (sequential)",
    "GRAD_DOT_INPUT": "Gradient · input (signed)",
    "INTEGRATED_GRADIENTS": "Integrated gradients (signed)",
    "OCCLUSION": "Occlusion: remove each segment (signed)",
    "LIME": "LIME: random removals, linear fit (signed)",
}
#: Methods computed by re-scoring perturbed prompts (no gradients); one per request.
PERTURBATION_METHODS: tuple[str, ...] = ("OCCLUSION", "LIME")
_METHOD_ALIASES: dict[str, str] = {
    "ig": "INTEGRATED_GRADIENTS",
    "l2": "GRAD_L2",
    "gdi": "GRAD_DOT_INPUT",
    "occ": "OCCLUSION",
}

#: Granularity enum names the UI offers, in display order.
GRANULARITIES: tuple[str, ...] = ("TOKENS", "WORDS", "SENTENCES", "LINES", "PARAGRAPHS", "CUSTOM_REGEX")
GRANULARITY_LABELS: dict[str, str] = {
    "TOKENS": "Tokens",
    "WORDS": "Words",
    "SENTENCES": "Sentences",
    "LINES": "Lines",
    "PARAGRAPHS": "Paragraphs",
    "CUSTOM_REGEX": "Custom regex",
}
_GRANULARITY_ALIASES: dict[str, str] = {"regex": "CUSTOM_REGEX", "custom": "CUSTOM_REGEX"}

#: Prompts up to this many chars travel in the URL; longer ones as example id + hash.
MAX_URL_PROMPT_CHARS = 2000
#: Reference / foil texts longer than this are left out of the URL (with a note on load).
MAX_URL_TEXT_CHARS = 1000

INTENSITY_MIN = 0.25
#: Lowest colour-range percentile a link may ask for.
CLIP_MIN = 50.0
INTENSITY_MAX = 8.0
MAX_CANDIDATES = 8
MAX_NEW_TOKENS_LIMIT = 1024


def parse_method(value: str) -> str:
    """A method enum name from a name in any case (or an alias such as ``ig``); ``ValueError`` if unknown."""
    text = value.strip()
    name = _METHOD_ALIASES.get(text.lower(), text.upper())
    if name not in METHODS:
        raise ValueError(f"unknown method {value!r}; use one of {', '.join(m.lower() for m in METHODS)}")
    return name


def parse_granularity(value: str) -> str:
    """A granularity enum name from any case (``regex`` = CUSTOM_REGEX); ``ValueError`` if unknown."""
    text = value.strip()
    name = _GRANULARITY_ALIASES.get(text.lower(), text.upper())
    if name not in GRANULARITIES:
        raise ValueError(
            f"unknown granularity {value!r}; use one of {', '.join(g.lower() for g in GRANULARITIES)}"
        )
    return name


def method_enum(name: str) -> int:
    """``seqsal.v1.Method`` value of a method name."""
    return int(common_pb2.Method.Value(name))


def granularity_enum(name: str) -> int:
    """``seqsal.v1.Granularity`` value of a granularity name."""
    return int(common_pb2.Granularity.Value(name))


def prompt_hash(prompt: str) -> str:
    """Short content hash of a prompt (12 hex digits of sha256), for links to long prompts."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class SideState:
    """Everything that defines one heatmap: prompt, generation, target, selection and method."""

    example_id: str = ""
    prompt: str = ""
    model: str = ""
    chat_template: bool = False
    target_kind: TargetKind = "candidate"
    candidate: int = 0
    reference: str = ""
    foil: str = ""
    #: Selected target segments (indices among the target's segments at ``granularity``).
    selection: tuple[int, ...] = ()
    method: str = "GRAD_L2"
    granularity: str = "SENTENCES"
    regex: str = ""
    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def generation_key(self) -> str:
        """Identity of the generation request: when it changes, the UI generates again."""
        payload = json.dumps(
            [
                self.prompt,
                self.model,
                self.chat_template,
                self.n,
                self.max_new_tokens,
                self.temperature,
                self.seed if self.temperature > 0 else 0,
                list(self.stop),
            ],
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class DisplayState:
    """How heatmaps are drawn (shared by both sides of a comparison)."""

    intensity: float = 1.0
    chips: bool = False
    compact: bool = False
    #: Count the attention-sink position and special tokens in the colour range (seqsal.scale).
    scale_all: bool = False
    #: The colour range is this percentile of |score| (None: the maximum).
    clip: float | None = None
    #: Segment scores: "sum" (the paper's) or "mean" over their tokens.
    aggregate: str = "sum"
    #: Side-by-side: both heatmaps share one colour range (the larger of their own ranges).
    shared_scale: bool = False
    #: Count a chat template's roles and built-in system prompt in the colour range.
    template: bool = True

    def rules_for(self, side: SideState) -> ScaleRules:
        """The scale rules of one side, shared by its heatmap and its HTML export (and the CLI's)."""
        return ScaleRules(
            include_sink=self.scale_all,
            include_special=self.scale_all,
            clip_percentile=self.clip,
            aggregate="mean" if self.aggregate == "mean" else "sum",
            include_template=self.template or not side.chat_template,
            user_text=side.prompt if side.chat_template else "",
        )

    @property
    def rules(self) -> ScaleRules:
        """The scale rules without a chat template (see :meth:`rules_for`)."""
        return self.rules_for(SideState())


@dataclass(frozen=True)
class ViewState:
    """The whole view: the current side, the pinned side (if any) and display settings."""

    current: SideState = field(default_factory=SideState)
    pinned: SideState | None = None
    display: DisplayState = field(default_factory=DisplayState)


# --------------------------------------------------------------------------- to the query

#: Example id -> the side that loading the example gives (see ``ui.examples.side_for_example``).
Baselines = Mapping[str, SideState]


def _fmt_float(x: float) -> str:
    return f"{x:g}"


def _encode(name: str, value: Any) -> str:
    if name in ("chat_template",):
        return "1" if value else "0"
    if name == "selection":
        return ",".join(str(i) for i in value)
    if name in ("method", "granularity"):
        return str(value).lower()
    if name == "temperature":
        return _fmt_float(value)
    if name == "stop":
        return json.dumps(list(value), ensure_ascii=False)
    return str(value)


# SideState field -> query key (the prompt and example id are handled on their own).
_KEYS: dict[str, str] = {
    "model": "model",
    "chat_template": "chat",
    "target_kind": "target",
    "candidate": "cand",
    "reference": "ref",
    "foil": "foil",
    "selection": "sel",
    "method": "method",
    "granularity": "gran",
    "regex": "re",
    "n": "n",
    "max_new_tokens": "max_new",
    "temperature": "temp",
    "seed": "seed",
    "stop": "stop",
}


def side_to_query(side: SideState, baselines: Baselines, prefix: str = "") -> dict[str, str]:
    """The query entries of one side: what differs from its example's baseline (or the defaults).

    ``baselines`` maps example ids to the side that loading the example gives, so a link to an
    unedited example is just ``?ex=<id>``.
    """
    base = baselines.get(side.example_id) if side.example_id else None
    q: dict[str, str] = {}
    if base is not None:
        q["ex"] = side.example_id
    else:
        base = SideState()
    if side.prompt != base.prompt:
        if len(side.prompt) <= MAX_URL_PROMPT_CHARS:
            q["prompt"] = side.prompt
        else:
            q["ph"] = prompt_hash(side.prompt)
    for name, key in _KEYS.items():
        value = getattr(side, name)
        if value == getattr(base, name):
            continue
        if name in ("reference", "foil") and len(value) > MAX_URL_TEXT_CHARS:
            continue
        if name == "regex" and side.granularity != "CUSTOM_REGEX":
            continue  # only the custom-regex granularity uses it
        q[key] = _encode(name, value)
    return {prefix + k: v for k, v in q.items()}


def to_query(view: ViewState, baselines: Baselines) -> dict[str, str]:
    """The whole view as query entries (defaults left out)."""
    q = side_to_query(view.current, baselines)
    disp, d = view.display, DisplayState()
    if disp.intensity != d.intensity:
        q["int"] = _fmt_float(disp.intensity)
    if disp.chips:
        q["chips"] = "1"
    if disp.compact:
        q["dense"] = "1"
    if disp.scale_all:
        q["all"] = "1"
    if disp.clip is not None:
        q["clip"] = _fmt_float(disp.clip)
    if disp.aggregate != d.aggregate:
        q["agg"] = disp.aggregate
    if disp.shared_scale:
        q["shared"] = "1"
    if not disp.template:
        q["tmpl"] = "0"
    if view.pinned is not None:
        q["pin"] = "1"
        q.update(side_to_query(view.pinned, baselines, prefix="pin."))
    return q


# --------------------------------------------------------------------------- from the query


def _first(value: Any) -> str:
    """A query value as one string (the last of a repeated key, as ``st.query_params`` does)."""
    if isinstance(value, list | tuple):
        return str(value[-1]) if value else ""
    return str(value)


def _int(raw: str, name: str, lo: int, hi: int, notes: list[str]) -> int | None:
    try:
        value = int(raw)
    except ValueError:
        notes.append(f"ignored {name}={raw!r}: not a whole number")
        return None
    if not lo <= value <= hi:
        notes.append(f"ignored {name}={raw!r}: must be between {lo} and {hi}")
        return None
    return value


def _float(raw: str, name: str, lo: float, hi: float, notes: list[str]) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        notes.append(f"ignored {name}={raw!r}: not a number")
        return None
    if not (math.isfinite(value) and lo <= value <= hi):
        notes.append(f"ignored {name}={raw!r}: must be between {lo:g} and {hi:g}")
        return None
    return value


def _bool(raw: str) -> bool:
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def side_from_query(
    params: Mapping[str, Any], baselines: Baselines, prefix: str = ""
) -> tuple[SideState, list[str]]:
    """One side from query entries; a value that cannot be used is skipped with a note.

    Starts from the baseline of the ``ex`` example (or the defaults). The prompt is the
    ``prompt`` entry, else the example's; a ``ph`` hash that does not match the example's prompt
    adds a note (the link's prompt was edited and too long to travel in the URL).
    """
    notes: list[str] = []
    get: dict[str, str] = {k[len(prefix) :]: _first(v) for k, v in params.items() if k.startswith(prefix)}
    if prefix == "":
        get = {k: v for k, v in get.items() if not k.startswith("pin.")}
    side = SideState()
    ex = get.get("ex", "")
    if ex:
        if ex in baselines:
            side = baselines[ex]
        else:
            notes.append(
                f"the link names example {ex!r}, which is not loaded here (an uploaded example lives "
                "only in the session that uploaded it: upload its file again, then pick it)"
            )
    changes: dict[str, Any] = {}
    if "prompt" in get:
        changes["prompt"] = get["prompt"]
    elif "ph" in get and get["ph"] != prompt_hash(side.prompt):
        if ex in baselines:
            notes.append(
                f"the link's prompt was edited from example {ex!r} and was too long to travel in the "
                "URL; showing the example's original prompt"
            )
        else:
            notes.append("the link's prompt was too long to travel in the URL and names no loaded example")
    for name in ("model", "reference", "foil", "regex"):
        if _KEYS[name] in get:
            changes[name] = get[_KEYS[name]]
    if "chat" in get:
        changes["chat_template"] = _bool(get["chat"])
    if "target" in get:
        if get["target"] in TARGET_KINDS:
            changes["target_kind"] = get["target"]
        else:
            notes.append(f"ignored target={get['target']!r}: use {', '.join(TARGET_KINDS)}")
    if "cand" in get and (v := _int(get["cand"], "cand", 0, MAX_CANDIDATES - 1, notes)) is not None:
        changes["candidate"] = v
    if "sel" in get:
        try:
            sel = tuple(sorted({int(x) for x in get["sel"].split(",") if x.strip()}))
            if any(i < 0 for i in sel):
                raise ValueError
            changes["selection"] = sel
        except ValueError:
            notes.append(f"ignored sel={get['sel']!r}: expected segment numbers like 0,2")
    if "method" in get:
        try:
            changes["method"] = parse_method(get["method"])
        except ValueError as exc:
            notes.append(f"ignored the method: {exc}")
    if "gran" in get:
        try:
            changes["granularity"] = parse_granularity(get["gran"])
        except ValueError as exc:
            notes.append(f"ignored the granularity: {exc}")
    if "n" in get and (v := _int(get["n"], "n", 1, MAX_CANDIDATES, notes)) is not None:
        changes["n"] = v
    limit = MAX_NEW_TOKENS_LIMIT
    if "max_new" in get and (v := _int(get["max_new"], "max_new", 1, limit, notes)) is not None:
        changes["max_new_tokens"] = v
    if "temp" in get and (t := _float(get["temp"], "temp", 0.0, 2.0, notes)) is not None:
        changes["temperature"] = t
    if "seed" in get and (v := _int(get["seed"], "seed", 0, 2**31 - 1, notes)) is not None:
        changes["seed"] = v
    if "stop" in get:
        try:
            stop = json.loads(get["stop"])
            if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
                raise ValueError
            changes["stop"] = tuple(stop)
        except ValueError:
            notes.append("ignored stop: expected a JSON list of non-empty strings")
    return replace(side, **changes), notes


def from_query(params: Mapping[str, Any], baselines: Baselines) -> tuple[ViewState, list[str]]:
    """The view a link describes, plus notes about anything in it that could not be used."""
    current, notes = side_from_query(params, baselines)
    get = {k: _first(v) for k, v in params.items()}
    changes: dict[str, Any] = {}
    if "int" in get and (x := _float(get["int"], "int", INTENSITY_MIN, INTENSITY_MAX, notes)) is not None:
        changes["intensity"] = x
    if "chips" in get:
        changes["chips"] = _bool(get["chips"])
    if "dense" in get:
        changes["compact"] = _bool(get["dense"])
    if "all" in get:
        changes["scale_all"] = _bool(get["all"])
    if "clip" in get and (x := _float(get["clip"], "clip", CLIP_MIN, 100.0, notes)) is not None:
        changes["clip"] = x
    if "shared" in get:
        changes["shared_scale"] = _bool(get["shared"])
    if "tmpl" in get:
        changes["template"] = _bool(get["tmpl"])
    if "agg" in get:
        if get["agg"] in AGGREGATES:
            changes["aggregate"] = get["agg"]
        else:
            notes.append(f"ignored agg: expected one of {', '.join(AGGREGATES)}")
    display = replace(DisplayState(), **changes)
    pinned = None
    if _bool(get.get("pin", "")):
        pinned, pin_notes = side_from_query(params, baselines, prefix="pin.")
        notes += [f"pinned side: {n}" for n in pin_notes]
    return ViewState(current=current, pinned=pinned, display=display), notes


def side_field_names() -> tuple[str, ...]:
    """Names of the :class:`SideState` fields (for tests and for wiring widgets)."""
    return tuple(f.name for f in fields(SideState))


def align_target_kind(side: SideState, pinned: SideState | None) -> SideState:
    """``side`` explaining the same kind of target as the ``pinned`` side, where it can.

    Side-by-side compares like with like: an example loaded next to a pinned side that explains
    its generated response explains its generated response too (not the example's reference),
    and the other way round when the example has a reference (or a foil) to explain.
    """
    if pinned is None or side.target_kind == pinned.target_kind:
        return side
    kind = pinned.target_kind
    if (kind == "reference" and not side.reference) or (kind == "foil" and not side.foil):
        return side
    return replace(side, target_kind=kind)


# --------------------------------------------------------------------------- selection


def apply_click(selection: tuple[int, ...], index: int, additive: bool) -> tuple[int, ...]:
    """The selection after a click on target segment ``index``.

    A plain click selects just that segment (clicking the only selected segment clears the
    selection, back to the whole target); a shift-click adds it, or removes it if it was selected.
    """
    if additive:
        chosen = set(selection)
        chosen.symmetric_difference_update({index})
        return tuple(sorted(chosen))
    if selection == (index,):
        return ()
    return (index,)
