"""Cache integrity, property-based, through the real saliency server.

* The key: hypothesis draws a request and a copy of it with one field changed. Fields that
  change the result (model, prompt, target, foil, selection, method, IG steps) must never
  share an entry; fields that do not (granularity, regex, method order, ``ig_steps = 0`` vs
  the default) must. The oracle is the test's own notion of what determines a result: a call
  must be a cache hit exactly when every method's result was asked for before, and its scores
  must equal those of a server without a cache.
* Corruption: a stored Redis entry (shared Redis, own key prefix, deleted afterwards) is
  damaged in a random way (a flipped byte, truncation, extra bytes, random bytes, or another
  key's valid entry) and the next call must recompute it, never serve it, and store a valid
  entry again.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from saliency_server.cache import InMemoryCache, decode_entry
from saliency_server.settings import SaliencySettings
from seqsal.client import channel_options
from seqsal.v1 import common_pb2, saliency_pb2, saliency_pb2_grpc

if TYPE_CHECKING:
    from conftest import RunningSaliencyServer, SaliencyServerFactory

pytestmark = pytest.mark.asyncio(loop_scope="session")

TEST_REDIS_URL = os.environ.get("SEQSAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DEFAULT_IG_STEPS = 2
IG = common_pb2.INTEGRATED_GRADIENTS
METHODS = [common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT, IG]
EXAMPLES = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def redis_up() -> bool:
    try:
        with redis.Redis.from_url(TEST_REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def server_settings(model_dirs: dict[str, Path], **overrides: Any) -> SaliencySettings:
    values: dict[str, Any] = {
        "models": [f"tiny={model_dirs['llama']}", f"gpt2={model_dirs['gpt2']}"],
        "port": 0,
        "device": "cpu",
        "dtype": "float32",
        "redis_url": None,
        "ig_steps": DEFAULT_IG_STEPS,
        "max_concurrency": 1,
    }
    return SaliencySettings(_env_file=None, **(values | overrides))  # type: ignore[call-arg]


async def in_thread(address: str, body: Callable[[saliency_pb2_grpc.SaliencyServiceStub], None]) -> None:
    """Run the (synchronous) hypothesis body in a worker thread: the loop keeps serving."""

    def run() -> None:
        with grpc.insecure_channel(address, options=channel_options()) as channel:
            body(saliency_pb2_grpc.SaliencyServiceStub(channel))

    await asyncio.to_thread(run)


def scores_of(response: saliency_pb2.SaliencyResponse) -> dict[int, np.ndarray]:
    return {s.method: np.asarray(s.scores, dtype=np.float64) for s in response.scores}


def assert_same_result(got: saliency_pb2.SaliencyResponse, want: saliency_pb2.SaliencyResponse) -> None:
    assert [t.id for t in got.tokens] == [t.id for t in want.tokens]
    assert list(got.target_mask) == list(want.target_mask)
    assert scores_of(got).keys() == scores_of(want).keys()
    for method, values in scores_of(want).items():
        np.testing.assert_allclose(scores_of(got)[method], values, rtol=1e-5, atol=1e-7, err_msg=str(method))
    assert got.target_logprob == pytest.approx(want.target_logprob, rel=1e-5, abs=1e-6)
    assert got.HasField("foil_logprob") == want.HasField("foil_logprob")


# --- the key ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A Saliency request as the test sees it; ``pattern`` is cycled over the target's tokens."""

    model: str
    prompt: str
    target: str
    foil: str | None
    methods: tuple[int, ...]
    pattern: tuple[bool, ...] | None  # None: no mask (the whole target)
    ig_steps: int
    granularity: int
    regex: str

    def mask(self, n_target: int) -> list[bool]:
        if self.pattern is None:
            return [True] * n_target
        mask = [self.pattern[i % len(self.pattern)] for i in range(n_target)]
        return mask if any(mask) else [*mask[:-1], True]

    def request(self, n_target: int) -> saliency_pb2.SaliencyRequest:
        request = saliency_pb2.SaliencyRequest(
            model=self.model,
            prompt=self.prompt,
            target=self.target,
            methods=list(self.methods),
            ig_steps=self.ig_steps,
            granularity=self.granularity,
            custom_regex=self.regex,
        )
        if self.pattern is not None:
            request.target_mask.extend(self.mask(n_target))
        if self.foil is not None:
            request.foil = self.foil
        return request

    def results(self, n_target: int) -> set[tuple[Any, ...]]:
        """What determines each method's result, the test's oracle for the cache key."""
        base = (self.model, self.prompt, self.target, self.foil, tuple(self.mask(n_target)))
        steps = self.ig_steps or DEFAULT_IG_STEPS
        return {(*base, m, steps if m == IG else 0) for m in self.methods}


# Near-identical values: a key that dropped a char, a field or the order would collide.
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["tiny", "gpt2"]),
    "prompt": st.sampled_from(["Q: Hi?\nA:", "Q: Hi!\nA:", "Q: Hi?\nA: ", "Tell me."]),
    "target": st.sampled_from([" Hello there.", " Hello there!", " Bye now."]),
    "foil": st.sampled_from([None, " No.", " No!"]),
    "methods": st.lists(st.sampled_from(METHODS), min_size=1, max_size=3).map(tuple),
    "pattern": st.one_of(st.none(), st.lists(st.booleans(), min_size=1, max_size=4).map(tuple)),
    "ig_steps": st.sampled_from([0, DEFAULT_IG_STEPS, 3]),
    "granularity": st.sampled_from([common_pb2.GRANULARITY_UNSPECIFIED, common_pb2.WORDS]),
}
SPECS = st.fixed_dictionaries(FIELDS).map(lambda f: Spec(regex="", **f))


@st.composite
def spec_pairs(draw: st.DrawFn) -> tuple[Spec, Spec]:
    """A spec and a copy with one field changed (CUSTOM_REGEX with a regex counts as one)."""
    spec = draw(SPECS)
    field = draw(st.sampled_from([*FIELDS, "regex"]))
    if field == "regex":
        other = replace(
            spec, granularity=common_pb2.CUSTOM_REGEX, regex=draw(st.sampled_from([",", r"\.", "e"]))
        )
    else:
        other = replace(spec, **{field: draw(FIELDS[field])})
    return spec, other


@pytest.fixture(scope="module")
async def servers(
    run_saliency_server: SaliencyServerFactory, tiny_model_dirs: dict[str, Path]
) -> AsyncIterator[tuple[RunningSaliencyServer, RunningSaliencyServer]]:
    """A server with an in-process cache, and a reference whose cache never keeps anything."""
    async with (
        run_saliency_server(server_settings(tiny_model_dirs)) as cached,
        run_saliency_server(server_settings(tiny_model_dirs)) as reference,
    ):
        reference.serving.cache = InMemoryCache(0)
        yield cached, reference


async def test_requests_share_an_entry_exactly_when_their_result_is_the_same(
    servers: tuple[RunningSaliencyServer, RunningSaliencyServer],
) -> None:
    cached, reference = servers
    asked: set[tuple[Any, ...]] = set()
    n_target: dict[tuple[str, str], int] = {}
    outcomes = {"hits": 0, "misses": 0}

    def body(stub: saliency_pb2_grpc.SaliencyServiceStub) -> None:
        with grpc.insecure_channel(reference.address, options=channel_options()) as channel:
            ref = saliency_pb2_grpc.SaliencyServiceStub(channel)

            def target_tokens(spec: Spec) -> int:
                key = (spec.model, spec.target)
                if key not in n_target:
                    request = common_pb2.TokenizeRequest(model=spec.model, text=spec.target, as_target=True)
                    n_target[key] = len(stub.Tokenize(request, timeout=60).tokens)
                return n_target[key]

            @EXAMPLES
            @given(pair=spec_pairs())
            def check(pair: tuple[Spec, Spec]) -> None:
                for spec in pair:
                    n = target_tokens(spec)
                    results = spec.results(n)
                    response = stub.Saliency(spec.request(n), timeout=60)
                    assert response.cache_hit == (results <= asked), (spec, results - asked)
                    outcomes["hits" if response.cache_hit else "misses"] += 1
                    assert_same_result(response, ref.Saliency(spec.request(n), timeout=60))
                    asked.update(results)

            check()

    await in_thread(cached.address, body)
    assert outcomes["hits"] and outcomes["misses"], outcomes  # both sides of the property were exercised
    print(f"\n[cache-integrity] key property: {outcomes}")


# --- corruption ------------------------------------------------------------------------------------

DAMAGE = ["flip", "truncate", "append", "random", "other key's entry"]


@pytest.fixture(scope="module")
def redis_prefix() -> Iterator[str]:
    """A unique key prefix on the shared Redis; every key under it is deleted afterwards."""
    prefix = f"seqsal-test-integrity-{uuid.uuid4().hex}"
    yield prefix
    with redis.Redis.from_url(TEST_REDIS_URL, socket_timeout=2) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
        assert not list(client.scan_iter(match=f"{prefix}:*"))


@pytest.mark.redis
@pytest.mark.skipif(not redis_up(), reason=f"no Redis server answering at {TEST_REDIS_URL}")
async def test_a_damaged_redis_entry_is_recomputed_never_served(
    run_saliency_server: SaliencyServerFactory, tiny_model_dirs: dict[str, Path], redis_prefix: str
) -> None:
    config = server_settings(tiny_model_dirs, redis_url=TEST_REDIS_URL, cache_prefix=redis_prefix)
    seen = {name: 0 for name in DAMAGE}
    async with run_saliency_server(config) as srv:

        def body(stub: saliency_pb2_grpc.SaliencyServiceStub) -> None:
            with redis.Redis.from_url(TEST_REDIS_URL, socket_timeout=2) as client:

                def keys() -> set[bytes]:
                    return set(client.scan_iter(match=f"{redis_prefix}:*", count=500))

                # Three requests, one entry each: remember which key holds which.
                requests = [
                    saliency_pb2.SaliencyRequest(
                        model="tiny", prompt=p, target=" Yes.", methods=[common_pb2.GRAD_L2]
                    )
                    for p in ("One?", "Two?", "Three?")
                ]
                originals, entry_keys = [], []
                for request in requests:
                    before = keys()
                    originals.append(stub.Saliency(request, timeout=60))
                    (key,) = keys() - before
                    entry_keys.append(key)

                @EXAMPLES
                @given(which=st.integers(0, 2), damage=st.sampled_from(DAMAGE), data=st.data())
                def check(which: int, damage: str, data: st.DataObject) -> None:
                    key = entry_keys[which]
                    good = client.get(key)
                    assert good is not None
                    decode_entry(good, key=key.decode())
                    # positions drawn independently of the entry's length keep the draws reproducible
                    at = data.draw(st.integers(0, 2**20)) % len(good)
                    if damage == "flip":
                        bad = good[:at] + bytes([good[at] ^ data.draw(st.integers(1, 255))]) + good[at + 1 :]
                    elif damage == "truncate":
                        bad = good[:at]
                    elif damage == "append":
                        bad = good + data.draw(st.binary(min_size=1, max_size=16))
                    elif damage == "random":
                        bad = data.draw(st.binary(max_size=256))
                    else:
                        bad = client.get(entry_keys[(which + 1) % 3])
                        assert bad is not None and bad != good
                    client.set(key, bad)
                    seen[damage] += 1

                    recomputed = stub.Saliency(requests[which], timeout=60)
                    assert not recomputed.cache_hit
                    assert_same_result(recomputed, originals[which])
                    stored = client.get(key)
                    assert stored is not None
                    decode_entry(stored, key=key.decode())  # a valid entry for this key again
                    hit = stub.Saliency(requests[which], timeout=60)
                    assert hit.cache_hit
                    assert_same_result(hit, originals[which])

                check()

        await in_thread(srv.address, body)
        corrupt = srv.serving.cache.corrupt
    assert corrupt == sum(seen.values()) and all(seen.values()), seen
    print(f"\n[cache-integrity] damaged entries detected and recomputed: {seen}")
