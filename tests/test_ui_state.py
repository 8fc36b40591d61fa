"""The UI's view state: URL query round trips, notes for bad links, selection clicks, stop strings."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ui.examples import Example, baselines
from ui.session import stop_to_text, text_to_stop
from ui.state import (
    MAX_URL_PROMPT_CHARS,
    DisplayState,
    SideState,
    ViewState,
    apply_click,
    from_query,
    parse_granularity,
    parse_method,
    prompt_hash,
    to_query,
)

EXAMPLES = [
    Example(
        id="quiche",
        title="Quiche",
        prompt="Taste-likes: Cheese\nAnalysis:",
        target=" A tart.",
        stop=("\n\n",),
    ),
    Example(id="long", title="Long", prompt="word " * 1000, granularity="WORDS"),
]
BASE = baselines(EXAMPLES)


def round_trip(view: ViewState) -> tuple[ViewState, list[str]]:
    query = to_query(view, BASE)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in query.items())
    return from_query(query, BASE)


def test_default_view_has_an_empty_query() -> None:
    assert to_query(ViewState(), BASE) == {}
    assert from_query({}, BASE) == (ViewState(), [])


def test_unedited_example_is_just_its_id() -> None:
    side = BASE["quiche"]
    assert side.target_kind == "reference" and side.reference == " A tart." and side.stop == ("\n\n",)
    assert to_query(ViewState(current=side), BASE) == {"ex": "quiche"}
    assert round_trip(ViewState(current=side)) == (ViewState(current=side), [])


def test_every_field_round_trips() -> None:
    current = SideState(
        example_id="quiche",
        prompt="Edited: <script>alert(1)</script> & ünïcödé\n\nline",
        model="gpt2",
        chat_template=True,
        target_kind="foil",
        candidate=2,
        reference="",
        foil=" Not suitable.",
        selection=(0, 3),
        method="INTEGRATED_GRADIENTS",
        granularity="CUSTOM_REGEX",
        regex=r"(?m)^\w+:",
        n=3,
        max_new_tokens=17,
        temperature=0.7,
        seed=42,
        stop=("\n", "###"),
    )
    pinned = replace(BASE["long"], selection=(5,), method="GRAD_DOT_INPUT")
    view = ViewState(
        current=current,
        pinned=pinned,
        display=DisplayState(
            intensity=2.5, chips=True, compact=True, scale_all=True, clip=95.0, aggregate="mean"
        ),
    )
    query = to_query(view, BASE)
    assert query["ref"] == ""  # cleared from the example's reference: kept explicitly
    assert query["pin"] == "1" and query["pin.ex"] == "long" and query["pin.sel"] == "5"
    assert "pin.prompt" not in query  # unedited long prompt: the example id is enough
    assert query["all"] == "1" and query["clip"] == "95" and query["agg"] == "mean"
    assert view.display.rules.include_sink and view.display.rules.clip_percentile == 95.0
    assert round_trip(view) == (view, [])


def test_long_edited_prompt_travels_as_hash_with_a_note() -> None:
    edited = replace(BASE["long"], prompt="word " * 999 + "changed")
    assert len(edited.prompt) > MAX_URL_PROMPT_CHARS
    query = to_query(ViewState(current=edited), BASE)
    assert query == {"ex": "long", "ph": prompt_hash(edited.prompt)}
    view, notes = from_query(query, BASE)
    assert view.current.prompt == BASE["long"].prompt
    assert len(notes) == 1 and "edited" in notes[0] and "long" in notes[0]

    # Without a known example there is nothing to show: a note says so.
    own = SideState(prompt="x" * (MAX_URL_PROMPT_CHARS + 1))
    view, notes = from_query(to_query(ViewState(current=own), BASE), BASE)
    assert view.current.prompt == "" and "too long" in notes[0]


def test_short_own_prompt_travels_in_the_link() -> None:
    own = SideState(prompt="2 + 2 =", reference=" 4", target_kind="reference")
    assert to_query(ViewState(current=own), BASE) == {"prompt": "2 + 2 =", "target": "reference", "ref": " 4"}
    assert round_trip(ViewState(current=own))[0].current == own


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"ex": "nope"}, "example 'nope'"),
        ({"method": "saliency"}, "unknown method"),
        ({"gran": "chapters"}, "unknown granularity"),
        ({"sel": "1,x"}, "sel="),
        ({"sel": "-1"}, "sel="),
        ({"n": "0"}, "n='0'"),
        ({"cand": "many"}, "cand='many'"),
        ({"temp": "nan"}, "temp='nan'"),
        ({"int": "100"}, "int='100'"),
        ({"clip": "10"}, "clip='10'"),
        ({"agg": "max"}, "ignored agg"),
        ({"stop": "[1]"}, "stop"),
        ({"target": "everything"}, "target='everything'"),
    ],
)
def test_bad_link_values_are_skipped_with_a_note(params: dict[str, str], fragment: str) -> None:
    view, notes = from_query(params, BASE)
    assert view == ViewState()
    assert len(notes) == 1 and fragment in notes[0]


def test_pinned_notes_are_labelled_and_repeated_keys_take_the_last() -> None:
    view, notes = from_query({"pin": "1", "pin.method": "x", "gran": ["words", "lines"]}, BASE)
    assert view.pinned == SideState() and view.current.granularity == "LINES"
    assert notes and notes[0].startswith("pinned side:")


def test_names_parse_in_any_case_and_aliases() -> None:
    assert parse_method("ig") == "INTEGRATED_GRADIENTS" and parse_method(" Grad_L2 ") == "GRAD_L2"
    assert parse_granularity("regex") == "CUSTOM_REGEX" and parse_granularity("Words") == "WORDS"


def test_generation_key_tracks_what_changes_the_response() -> None:
    side = SideState(prompt="hi")
    assert side.generation_key() == replace(side, method="GRAD_DOT_INPUT", selection=(1,)).generation_key()
    assert side.generation_key() == replace(side, seed=5).generation_key()  # greedy ignores the seed
    for change in ({"prompt": "ho"}, {"model": "m"}, {"chat_template": True}, {"n": 2}, {"stop": ("x",)}):
        assert side.generation_key() != replace(side, **change).generation_key()
    hot = replace(side, temperature=0.5)
    assert hot.generation_key() != replace(hot, seed=1).generation_key()


def test_apply_click() -> None:
    assert apply_click((), 2, additive=False) == (2,)
    assert apply_click((2,), 4, additive=False) == (4,)
    assert apply_click((2,), 2, additive=False) == ()  # clicking the selection again: whole target
    assert apply_click((2, 4), 2, additive=False) == (2,)
    assert apply_click((2,), 4, additive=True) == (2, 4)  # shift-click adds
    assert apply_click((2, 4), 2, additive=True) == (4,)  # ...or removes
    assert apply_click((), 1, additive=True) == (1,)


@pytest.mark.parametrize("stop", [(), ("\n\n",), ("a\\nb", "\t", "x\\"), ("Question:", "\n\nQ:")])
def test_stop_strings_as_text(stop: tuple[str, ...]) -> None:
    assert text_to_stop(stop_to_text(stop)) == stop
    assert "\n" not in "".join(stop_to_text((s,)) for s in stop)
