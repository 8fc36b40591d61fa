"""saliency_server/scores.py: one entry type, its cache codec (reading what servers wrote before) and
its wire codec."""

from __future__ import annotations

import numpy as np
import pytest

from saliency_server.cache import InMemoryCache, get_entry, put_entry
from saliency_server.engine import SaliencyResult
from saliency_server.scores import MethodEntry, from_cache, from_result, to_cache, to_wire
from seqsal.v1 import common_pb2

asyncio = pytest.mark.asyncio(loop_scope="session")

SIZES = {"n_tokens": 5, "n_target": 2}
SCORES = np.asarray([0.0, 0.5, -1.25, 0.0, 0.0], dtype=np.float32)
LOGPROBS = np.asarray([-0.5, -2.0], dtype=np.float32)


def entry(**overrides: object) -> MethodEntry:
    values: dict[str, object] = {
        "scores": SCORES,
        "target_token_logprobs": LOGPROBS,
        "target_logprob": -2.5,
        "foil_logprob": None,
        "ig_residual": None,
        "ig_steps": 0,
    }
    return MethodEntry(**(values | overrides))  # type: ignore[arg-type]


def same(a: MethodEntry | None, b: MethodEntry) -> None:
    assert a is not None
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.target_token_logprobs, b.target_token_logprobs)
    assert (a.target_logprob, a.foil_logprob, a.ig_residual, a.ig_steps) == (
        b.target_logprob,
        b.foil_logprob,
        b.ig_residual,
        b.ig_steps,
    )
    assert (a.r2, a.perturbations, a.scored_by) == (b.r2, b.perturbations, b.scored_by)


CASES = [
    (common_pb2.GRAD_L2, entry(foil_logprob=-3.0)),
    (common_pb2.INTEGRATED_GRADIENTS, entry(ig_residual=0.01, ig_steps=8)),
    (common_pb2.LIME, entry(r2=0.9, perturbations=64, scored_by="saliency server")),
]


@asyncio
@pytest.mark.parametrize(("method", "value"), CASES)
async def test_cache_round_trip(method: int, value: MethodEntry) -> None:
    cache = InMemoryCache(1 << 20)
    await put_entry(cache, "k", *to_cache(method, value))
    stored = await get_entry(cache, "k")
    assert stored is not None
    same(from_cache(*stored, **SIZES), value)


@asyncio
async def test_entries_written_before_are_read_as_they_were() -> None:
    """The layout serving._store wrote before this module existed, literally."""
    cache = InMemoryCache(1 << 20)
    old_meta = {
        "target_logprob": -2.5,
        "foil_logprob": None,
        "ig_residual": 0.01,
        "ig_steps": 8,
    }
    await put_entry(cache, "ig", old_meta, {"scores": SCORES, "target_token_logprobs": LOGPROBS})
    old_lime = {"target_logprob": -2.5, "foil_logprob": None, "ig_residual": None, "ig_steps": 0}
    old_lime |= {"r2": 0.9, "perturbations": 64, "scored_by": "inference server"}
    await put_entry(cache, "lime", old_lime, {"scores": SCORES, "target_token_logprobs": LOGPROBS})
    ig, lime = await get_entry(cache, "ig"), await get_entry(cache, "lime")
    assert ig is not None and lime is not None
    same(from_cache(*ig, **SIZES), entry(ig_residual=0.01, ig_steps=8))
    same(from_cache(*lime, **SIZES), entry(r2=0.9, perturbations=64, scored_by="inference server"))
    assert to_cache(common_pb2.INTEGRATED_GRADIENTS, entry(ig_residual=0.01, ig_steps=8))[0] == old_meta


@pytest.mark.parametrize(
    ("meta", "arrays", "sizes"),
    [
        ({}, {"scores": SCORES, "target_token_logprobs": LOGPROBS}, SIZES),  # no objective
        ({"target_logprob": "x"}, {"scores": SCORES, "target_token_logprobs": LOGPROBS}, SIZES),
        ({"target_logprob": True}, {"scores": SCORES, "target_token_logprobs": LOGPROBS}, SIZES),
        ({"target_logprob": -1.0}, {"scores": SCORES}, SIZES),  # an array missing
        (
            {"target_logprob": -1.0},
            {"scores": SCORES, "target_token_logprobs": LOGPROBS},
            {"n_tokens": 6, "n_target": 2},
        ),
        (
            {"target_logprob": -1.0, "ig_steps": 1.5},
            {"scores": SCORES, "target_token_logprobs": LOGPROBS},
            SIZES,
        ),
        (
            {"target_logprob": -1.0},
            {"scores": SCORES.astype(np.int32), "target_token_logprobs": LOGPROBS},
            SIZES,
        ),
    ],
)
def test_what_is_not_a_whole_entry_is_a_miss(meta: dict, arrays: dict, sizes: dict) -> None:
    assert from_cache(meta, arrays, **sizes) is None


def test_from_result_and_to_wire() -> None:
    ig, l2 = common_pb2.INTEGRATED_GRADIENTS, common_pb2.GRAD_L2
    result = SaliencyResult(
        selection=0,
        scores={l2: SCORES, ig: SCORES * 2},
        target_token_logprobs=LOGPROBS,
        target_logprob=-2.5,
        foil_logprob=None,
        ig_residual=0.25,
        ig_steps=4,
    )
    entries = from_result(result)
    assert (entries[l2].ig_residual, entries[l2].ig_steps) == (None, 0)
    wire = to_wire(ig, entries[ig])
    assert list(wire.scores) == (SCORES * 2).tolist() and wire.ig_steps == 4
    assert wire.completeness_residual == 0.25 and not wire.HasField("r2")
    lime = to_wire(common_pb2.LIME, entry(r2=0.5, perturbations=3, scored_by="here"))
    assert (lime.r2, lime.perturbations, lime.scored_by) == (0.5, 3, "here")
    assert not to_wire(l2, entries[l2]).HasField("completeness_residual")
