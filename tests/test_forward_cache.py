"""Forward passes kept between calls: reused only for the same ids, same numbers, bounded, let go.

The reuse is checked by counting the model's forward passes (a forward pre-hook) and by
comparing every score with an engine that keeps nothing; the bounds with a fake clock and
hand-sized entries; the byte count on operations whose saved tensors are known.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_engine import FOIL_SHORT, assert_same_result, problem, random_mask
from test_scheduler import FakeJobs
from tiny_models import ARCHITECTURES

from saliency_server.checkpointing import CheckpointPolicy
from saliency_server.engine import GradientEngine, SaliencyInputs
from saliency_server.forward_cache import ForwardCache, HeldForward, SavedBytes
from saliency_server.scheduler import Priority, Scheduler, State
from seqsal.v1 import common_pb2
from server_kit.model_registry import load_causal_lm, load_tokenizer

METHODS = (common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT)
MIB = 1024 * 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def held(nbytes: int, mode: str = "off") -> HeldForward:
    empty = torch.zeros(1)
    return HeldForward(leaf=empty, outputs=empty, token_lp=np.zeros(1, np.float32), mode=mode, nbytes=nbytes)


def test_cache_bounds_entries_bytes_and_age() -> None:
    clock = FakeClock()
    cache = ForwardCache(max_bytes=100, max_entries=2, ttl_s=10, clock=clock)
    assert cache.put("a", held(40)) and cache.put("b", held(40))
    assert cache.get("a") is not None  # "a" is now the most recently used
    assert cache.put("c", held(40))  # two entries at most: the least recently used ("b") goes
    assert cache.get("b") is None and len(cache) == 2 and cache.bytes_held() == 80
    assert cache.put("d", held(90))  # bytes: both others must go to make room
    assert len(cache) == 1 and cache.get("a") is None and cache.get("c") is None
    assert not cache.put("e", held(101))  # larger than the cache: not kept, nothing evicted
    assert cache.get("d") is not None
    clock.now = 10.5
    assert cache.get("d") is None and cache.bytes_held() == 0  # expired 10 s after its last use
    assert cache.hits == 2 and cache.misses == 4


def test_only_passes_that_can_be_backpropagated_again_are_kept() -> None:
    cache = ForwardCache(max_bytes=100)
    assert cache.keeps("off") and cache.keeps("full") and not cache.keeps("keep_attention")
    assert not cache.put("k", held(1, "keep_attention")) and len(cache) == 0
    assert not ForwardCache(max_bytes=0).put("k", held(1))  # off
    cache.put("k", held(30))
    assert cache.release() == 30 and len(cache) == 0


def test_saved_bytes_counts_saved_activations_once_and_not_the_weights() -> None:
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    saved = SavedBytes(linear)
    with saved.counting():
        h = linear(x)  # saves its input x (and the weight, which is the model's)
        y = (h * h).sum()  # saves h, twice: one storage
    assert saved.nbytes == x.nbytes + h.nbytes
    assert y.requires_grad


@contextmanager
def counting_forwards(model: Any) -> Iterator[list[int]]:
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def models(tiny_model_dirs: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    cpu = torch.device("cpu")
    return {
        arch: (load_causal_lm(path, cpu, torch.float32), load_tokenizer(path))
        for arch, path in tiny_model_dirs.items()
    }


def engines(model: Any, mode: str) -> tuple[GradientEngine, GradientEngine]:
    """An engine that keeps forward passes and one that does not, both checkpointing as ``mode``."""
    policy = CheckpointPolicy(mode=mode)  # type: ignore[arg-type]
    keeping = GradientEngine(
        model, checkpoint_policy=policy, forward_cache=ForwardCache(max_bytes=256 * MIB, max_entries=4)
    )
    return keeping, GradientEngine(model, checkpoint_policy=policy)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(("mode", "foil"), [("off", None), ("full", None), ("off", FOIL_SHORT)])
def test_a_second_granularity_reuses_the_forward_with_the_same_scores(
    arch: str, mode: str, foil: str | None, models: dict[str, tuple[Any, Any]]
) -> None:
    model, tokenizer = models[arch]
    inputs = problem(tokenizer, foil=foil)
    n = len(inputs.target_ids)
    first = np.stack([random_mask(n, seed) for seed in range(3)])  # e.g. the sentences
    second = np.stack([random_mask(n, seed) for seed in range(10, 14)])  # then the words
    if foil is not None:  # selections starting at the same token share one contrastive pass
        first[:, 0] = second[:, 0] = True
    keeping, plain = engines(model, mode)
    with counting_forwards(model) as calls:
        list(keeping.saliency_batch(inputs, first, METHODS))
        assert len(calls) == 1 and len(keeping.forward_cache) == 1
        reused = list(keeping.saliency_batch(inputs, second, METHODS))
        assert len(calls) == 1  # no forward pass for the second call
    assert keeping.last_checkpointing == mode
    expected = list(plain.saliency_batch(inputs, second, METHODS))
    assert sorted(r.selection for r in reused) == list(range(len(second)))
    by_selection = {r.selection: r for r in expected}
    for actual in reused:
        assert_same_result(actual, by_selection[actual.selection])


def test_other_ids_and_keep_attention_passes_run_their_own_forward(
    models: dict[str, tuple[Any, Any]],
) -> None:
    model, tokenizer = models["llama"]
    inputs = problem(tokenizer)
    other = SaliencyInputs(inputs.prompt_ids[:-1], inputs.target_ids)
    mask = np.ones((1, len(inputs.target_ids)), dtype=bool)
    keeping, _ = engines(model, "off")
    with counting_forwards(model) as calls:
        list(keeping.saliency_batch(inputs, mask, METHODS))
        list(keeping.saliency_batch(other, mask, METHODS))
        assert len(calls) == 2  # other ids: their own forward
    single, _ = engines(model, "keep_attention")
    with counting_forwards(model) as calls:
        list(single.saliency_batch(inputs, mask, METHODS))
        list(single.saliency_batch(inputs, mask, METHODS))
        assert len(calls) == 2 and len(single.forward_cache) == 0  # freed by its one backward


def test_integrated_gradients_after_a_kept_forward_is_unchanged(models: dict[str, tuple[Any, Any]]) -> None:
    model, tokenizer = models["qwen2"]
    inputs = problem(tokenizer)
    masks = np.stack([random_mask(len(inputs.target_ids), seed) for seed in range(2)])
    keeping, plain = engines(model, "off")
    list(keeping.saliency_batch(inputs, masks, METHODS))
    methods = (*METHODS, common_pb2.INTEGRATED_GRADIENTS)
    reused = list(keeping.saliency_batch(inputs, masks, methods, ig_steps=4))
    for actual, reference in zip(
        reused, plain.saliency_batch(inputs, masks, methods, ig_steps=4), strict=True
    ):
        assert_same_result(actual, reference)


def test_the_scheduler_counts_kept_forwards_and_lets_them_go_for_a_ticket() -> None:
    cache = ForwardCache(max_bytes=100)
    cache.put("k", held(70))
    scheduler = Scheduler("m", budget_bytes=100, reserve=cache)
    ticket = scheduler.submit("a", Priority.BACKGROUND, cost_bytes=50)  # 70 + 50 > 100
    assert ticket.state is State.RUNNING and len(cache) == 0  # the kept forward gave way
    cache.put("k", held(30))
    small = Scheduler("m", budget_bytes=100, reserve=cache).submit("a", Priority.BACKGROUND, cost_bytes=50)
    assert small.state is State.RUNNING and len(cache) == 1  # room for both: kept
    jobs = FakeJobs(scheduler)
    jobs.start(ticket, 1)
    jobs.join()
    assert jobs.outcome == {ticket.id: "done"}


def test_segment_passes_are_checkpointed_so_that_they_can_be_kept(models: dict[str, tuple[Any, Any]]) -> None:
    model, tokenizer = models["mistral"]
    inputs = problem(tokenizer)
    n = len(inputs.target_ids)
    policy = CheckpointPolicy(mode="auto", min_tokens=1)  # every pass is long enough to checkpoint
    keeping = GradientEngine(
        model, checkpoint_policy=policy, forward_cache=ForwardCache(max_bytes=256 * MIB, max_entries=4)
    )
    list(keeping.saliency_batch(inputs, np.ones((1, n), dtype=bool), METHODS))
    assert keeping.last_checkpointing == "keep_attention" and len(keeping.forward_cache) == 0  # one click
    segments = np.stack([random_mask(n, seed) for seed in range(3)])
    list(keeping.saliency_batch(inputs, segments, METHODS))
    assert keeping.last_checkpointing == "full" and len(keeping.forward_cache) == 1  # a response's segments
    plain = GradientEngine(model, checkpoint_policy=policy)
    list(plain.saliency_batch(inputs, segments, METHODS))
    assert plain.last_checkpointing == "keep_attention"  # nothing is kept: the cheaper mode


def test_kept_bytes_and_lookups_are_exported_per_model() -> None:
    from prometheus_client import generate_latest

    from saliency_server.metrics import SaliencyCollector
    from server_kit.metrics import ServerMetrics

    cache = ForwardCache(max_bytes=100)
    cache.put("k", held(42))
    cache.get("k"), cache.get("other")
    metrics = ServerMetrics("saliency")
    metrics.watch(SaliencyCollector([], {"m": Scheduler("m", reserve=cache)}))
    text = generate_latest(metrics.registry).decode()
    assert 'seqsal_forward_cache_bytes{model="m"} 42.0' in text
    assert 'seqsal_forward_cache_lookups_total{model="m",result="hit"} 1.0' in text
    assert 'seqsal_forward_cache_lookups_total{model="m",result="miss"} 1.0' in text


def test_contrastive_selections_keep_one_forward_per_frame(models: dict[str, tuple[Any, Any]]) -> None:
    """With a foil a selection from target token ``a`` on is contrasted in the frame prompt + target[:a]:
    each frame is its own forward pass and its own entry, never another frame's."""
    model, tokenizer = models["llama"]
    inputs = problem(tokenizer, foil=FOIL_SHORT)
    n = len(inputs.target_ids)
    masks = np.zeros((2, n), dtype=bool)
    masks[0, :2] = True  # frame a = 0
    masks[1, 2:4] = True  # frame a = 2
    keeping, plain = engines(model, "off")
    list(keeping.saliency_batch(inputs, masks, METHODS))
    assert len(keeping.forward_cache) == 2
    with counting_forwards(model) as calls:
        again = {r.selection: r for r in keeping.saliency_batch(inputs, masks[::-1].copy(), METHODS)}
        assert len(calls) == 1  # only the no-grad pass for the whole target's log-probs
    expected = list(plain.saliency_batch(inputs, masks[::-1].copy(), METHODS))
    assert sorted(again) == sorted(r.selection for r in expected) == [0, 1]
    for reference in expected:
        assert_same_result(again[reference.selection], reference)
