"""bench/bench_first_segment.py's measure on hand-made responses (the benchmark runs the real model)."""

from __future__ import annotations

from test_scale import PROMPT, TARGET, _response, _restaurant_like

from bench.bench_first_segment import first_segment_rank
from seqsal.scale import ScaleRules

PLAIN = ScaleRules(include_sink=True)


def test_the_sink_ranks_the_first_segment_first_only_in_plain_sums() -> None:
    response = _restaurant_like()  # "Analyze" (4.77) + " a menu item." (2.0) = 6.77 > 6.03
    assert first_segment_rank(response, PLAIN) == 1
    # without the sink, " a menu item." (2.0) is the last of the three counted prompt units
    assert first_segment_rank(response, ScaleRules()) == 3


def test_a_first_segment_that_is_the_sink_alone_has_no_rank() -> None:
    pieces = [
        ("Analyze", PROMPT, False, 9.0),
        (" the", PROMPT, False, 1.0),
        (" menu", PROMPT, False, 2.0),
        (" Tasty", TARGET, False, 0.0),
    ]
    response = _response(pieces, [(PROMPT, 0, 1), (PROMPT, 1, 2), (PROMPT, 2, 3), (TARGET, 3, 4)])
    assert first_segment_rank(response, PLAIN) == 1
    assert first_segment_rank(response, ScaleRules()) is None  # nothing of it is in the range
