"""Benchmark of the saliency service on a real model through a real gRPC server.

Run from the repository root::

    .venv/bin/python bench/bench_saliency.py [--sizes 128,512,2048] [--repeats 3] [--json out.json]
                                             [--model PATH]

A SaliencyService gRPC server is started in this process on a free port (the same
``build_serving``/``build_server`` as ``seqsal serve saliency``, with the in-process LRU
cache) and driven through :class:`seqsal.client.AsyncSaliencyClient`. Every absolute
number comes with a ratio against a reference measured in the same process, so that
results stay comparable on a shared, noisy machine:

1. Saliency latency (GRAD_L2 + GRAD_DOT_INPUT, ~16-token target, every target token
   selected) per prompt size, as a multiple of one plain no-grad forward pass of the
   same tokens (the spec says one forward and one backward per call: expect ~2-3x).
2. SaliencyAllSegments (one forward, batched backwards) against one Saliency call per
   target segment, for a 512-token prompt and a ~40-token target at WORDS granularity.
3. Cache-hit latency of an identical repeated call, as a fraction of the miss latency.
4. Peak RSS increase during a call, as a multiple of the forward pass's increase.
5. Integrated gradients (ig_steps=16) at 512 tokens, as a multiple of the gradient call.

Cache misses are guaranteed by giving every computed call its own prompt (a variant
number inside the text changes its tokens); prompts are cut to exact token counts with
the model's own tokenizer. This is a benchmark, not a test: CI never runs it.
"""

from __future__ import annotations

import os

# Before huggingface_hub / transformers are imported anywhere: never download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import gc
import itertools
import json
import logging
import platform
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.table import Table

from saliency_server.server import build_server, build_serving
from saliency_server.serving import SaliencyServing
from saliency_server.settings import SaliencySettings
from seqsal.client import AsyncSaliencyClient, all_segments_request, saliency_request
from seqsal.v1 import common_pb2
from server_kit.tokenization import tokenize

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
GRADIENT_METHODS = (common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT)
GRANULARITIES = {"words": common_pb2.WORDS, "sentences": common_pb2.SENTENCES}

# 120 columns when piped (rich would wrap at 80); log lines without the source location.
console = Console(width=None if sys.stdout.isatty() else 120, log_path=False)

# --- workload -------------------------------------------------------------------------------------

INSTRUCTION = "Analyze a menu item in a restaurant (order #{variant}).\n\n## For example:\n\n"

EXAMPLES = (
    (
        "I've a sweet-tooth",
        "Don't like onions or garlic",
        "Onion soup",
        "You don't like onions or garlic, and onion soup is made almost entirely of slowly "
        "caramelised onions with a garlic crouton on top. Nothing in it is sweet either.",
        "Avoid.",
    ),
    (
        "I've a sweet-tooth",
        "Don't like onions or garlic",
        "Chocolate lava cake",
        "A warm chocolate cake with a molten centre, served with vanilla ice cream. It is "
        "rich and very sweet, and it contains no onions or garlic at all.",
        "Strongly recommend.",
    ),
    (
        "Spicy food and bold flavours",
        "Very sweet desserts, mushrooms",
        "Chicken vindaloo",
        "A fiery Goan curry of chicken marinated in vinegar, chillies and spices. It is hot "
        "and bold, has no mushrooms, and is not sweet.",
        "Recommend.",
    ),
    (
        "Seafood, fresh herbs",
        "Anything deep-fried",
        "Fish and chips",
        "Battered cod and chips, both deep-fried. The fish is fresh, but the dish is the "
        "opposite of light and there are no herbs beyond a little parsley.",
        "Avoid.",
    ),
    (
        "Cheese, Italian food",
        "Spicy food",
        "Margherita pizza",
        "A thin-crust pizza with tomato, mozzarella and basil, baked in a wood-fired oven. "
        "It is cheesy, Italian and mild.",
        "Recommend.",
    ),
)

QUERY = (
    "\n\nTaste-likes: Fresh vegetables and tangy dressings\n"
    "Taste-dislikes: Don't like onions or garlic\n"
    "Suggestion: Greek salad\n"
    "Analysis:"
)

TARGET_TEXT = (
    " A Greek salad is tomatoes, cucumber, olives and feta with a lemon and oregano dressing. "
    "It is fresh and tangy, which you like, but it is usually topped with raw red onion, "
    "which you dislike. Ask the kitchen to leave the onion out and it is a good choice.\n"
    "Recommendation: Recommend, without onion."
)


def few_shot_text(variant: int, min_chars: int) -> str:
    """The few-shot examples, repeated (each copy numbered with ``variant``) to at least ``min_chars``."""
    parts = [INSTRUCTION.format(variant=variant)]
    length = len(parts[0])
    for i in itertools.count(1):
        likes, dislikes, suggestion, analysis, verdict = EXAMPLES[(i - 1) % len(EXAMPLES)]
        block = (
            f"Example {variant}.{i}\nTaste-likes: {likes}\nTaste-dislikes: {dislikes}\n"
            f"Suggestion: {suggestion}\nAnalysis: {analysis}\nRecommendation: {verdict}\n\n"
        )
        parts.append(block)
        length += len(block)
        if length >= min_chars:
            return "".join(parts)
    raise AssertionError("unreachable")


def count_tokens(tokenizer: Any, text: str, *, as_target: bool) -> int:
    return len(tokenizer(text, add_special_tokens=not as_target)["input_ids"])


def cut_to_tokens(tokenizer: Any, head: str, tail: str, n_tokens: int, *, as_target: bool) -> str:
    """``head[:k] + tail`` with exactly ``n_tokens`` tokens (as the server tokenises it).

    ``k`` starts at a token boundary of ``head`` and is corrected until re-tokenising the
    joined text gives the exact count (token merges across the cut can shift it by one).
    """
    specials = not as_target
    n_tail = count_tokens(tokenizer, tail, as_target=True) if tail else 0
    if n_tail >= n_tokens - 8:  # too short for the tail: the head alone
        tail, n_tail = "", 0
    offsets = tokenizer(head, add_special_tokens=specials, return_offsets_mapping=True)["offset_mapping"]
    ends = [end for _, end in offsets if end > 0]
    if len(ends) < n_tokens:
        raise ValueError(f"text too short for {n_tokens} tokens ({len(ends)})")
    keep = max(1, n_tokens - n_tail)
    seen: set[int] = set()
    for _ in range(64):
        candidate = head[: ends[keep - 1]] + tail
        got = count_tokens(tokenizer, candidate, as_target=as_target)
        if got == n_tokens:
            return candidate
        seen.add(keep)
        step = n_tokens - got
        keep = keep + step if keep + step not in seen else keep + (1 if step > 0 else -1)
        while keep in seen:
            keep += 1 if step > 0 else -1
        keep = min(max(keep, 1), len(ends))
    raise ValueError(f"could not cut the text to exactly {n_tokens} tokens")


@dataclass
class Workload:
    """Builds prompts and targets of exact token counts; every prompt variant is new."""

    tokenizer: Any
    variants: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def prompt(self, n_tokens: int) -> str:
        variant = next(self.variants)
        head = few_shot_text(variant, min_chars=8 * n_tokens + 400)
        return cut_to_tokens(self.tokenizer, head, QUERY, n_tokens, as_target=False)

    def target(self, n_tokens: int) -> str:
        return cut_to_tokens(self.tokenizer, TARGET_TEXT, "", n_tokens, as_target=True)

    def ids(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """Prompt and target token ids exactly as the server builds them."""
        prompt_ids = [
            t.id for t in tokenize(self.tokenizer, prompt, part=common_pb2.PROMPT, add_special_tokens=True)
        ]
        target_ids = [
            t.id for t in tokenize(self.tokenizer, target, part=common_pb2.TARGET, add_special_tokens=False)
        ]
        return prompt_ids, target_ids


# --- measuring --------------------------------------------------------------------------------------


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Give freed heap memory back to the OS, so that RSS baselines don't hide the next peak."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class PeakRss:
    """Peak RSS increase over a block: sampled every ``interval`` s in a background thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        release_free_memory()
        self.baseline = self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def increase_mib(self) -> float:
        return (self.peak - self.baseline) / MIB


@contextlib.contextmanager
def measured() -> Iterator[dict[str, float]]:
    """``{"s": seconds, "mib": peak RSS increase}`` of the block, filled in on exit."""
    out: dict[str, float] = {}
    with PeakRss() as rss:
        started = time.perf_counter()
        yield out
        out["s"] = time.perf_counter() - started
    out["mib"] = rss.increase_mib


def forward_pass(model: Any, prompt_ids: Sequence[int], target_ids: Sequence[int]) -> None:
    """One plain no-grad forward pass of prompt + target, computing the logits the engine needs.

    Like the engine, it asks only for the logits at the positions that predict target tokens
    (``logits_to_keep``): the full (T, vocab) logits would add a large head matmul and, at 2048
    tokens, ~400 MiB of memory that the saliency call never allocates.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(target_ids)], device=device)
    n_prompt = len(prompt_ids)
    positions = torch.arange(n_prompt - 1, n_prompt - 1 + len(target_ids), device=device)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=positions)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


@dataclass
class SizeResult:
    prompt_tokens: int
    target_tokens: int
    forward_s: list[float] = field(default_factory=list)
    forward_mib: list[float] = field(default_factory=list)
    miss_s: list[float] = field(default_factory=list)
    miss_server_ms: list[float] = field(default_factory=list)
    miss_mib: list[float] = field(default_factory=list)
    hit_s: list[float] = field(default_factory=list)
    hit_server_ms: list[float] = field(default_factory=list)

    @property
    def forward_median_s(self) -> float:
        return median(self.forward_s)

    @property
    def miss_median_s(self) -> float:
        return median(self.miss_s)

    @property
    def hit_median_s(self) -> float:
        return median(self.hit_s)

    def summary(self) -> dict[str, float]:
        return {
            "forward_median_ms": self.forward_median_s * 1000,
            "miss_median_ms": self.miss_median_s * 1000,
            "miss_over_forward": ratio(self.miss_median_s, self.forward_median_s),
            # each repeat's call over the forward pass timed right beside it, then the median: on a
            # shared machine the load drifts, and a pair sees about the same load
            "miss_over_forward_paired": median(
                [ratio(m, f) for m, f in zip(self.miss_s, self.forward_s, strict=True)]
            ),
            "miss_over_forward_best": ratio(min(self.miss_s), min(self.forward_s)),
            "hit_median_ms": self.hit_median_s * 1000,
            "hit_over_miss": ratio(self.hit_median_s, self.miss_median_s),
            "forward_peak_mib": max(self.forward_mib, default=float("nan")),
            "miss_peak_mib": max(self.miss_mib, default=float("nan")),
            "miss_mib_over_forward_mib": ratio(
                max(self.miss_mib, default=float("nan")), max(self.forward_mib, default=float("nan"))
            ),
        }


@dataclass
class SegmentsResult:
    prompt_tokens: int
    target_tokens: int
    granularity: str
    segments: int
    # two streaming calls (each on a new prompt), one before and one after the separate calls:
    # their mean brackets the load drift over the minutes the separate calls take
    stream_s: list[float]
    stream_first_s: list[float]
    stream_mib: list[float]
    separate_s: list[float]
    separate_mib_max: float

    def summary(self) -> dict[str, float]:
        total = sum(self.separate_s)
        stream = statistics.fmean(self.stream_s)
        return {
            "stream_ms": stream * 1000,
            "stream_first_segment_ms": statistics.fmean(self.stream_first_s) * 1000,
            "separate_total_ms": total * 1000,
            "separate_median_call_ms": median(self.separate_s) * 1000,
            "speedup": ratio(total, stream),
            "stream_peak_mib": max(self.stream_mib),
            "separate_peak_mib": self.separate_mib_max,
        }


@dataclass
class IgResult:
    prompt_tokens: int
    target_tokens: int
    ig_steps: int
    ig_s: float
    ig_mib: float
    # a gradient call (GRAD_L2 + GRAD_DOT_INPUT) on another new prompt, timed right before
    gradient_s: float
    gradient_mib: float
    completeness_residual: float | None

    def summary(self) -> dict[str, float]:
        return {
            "ig_ms": self.ig_s * 1000,
            "gradient_ms": self.gradient_s * 1000,
            "ig_over_gradient": ratio(self.ig_s, self.gradient_s),
            "ig_mib_over_gradient_mib": ratio(self.ig_mib, self.gradient_mib),
        }


# --- the benchmark ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, client: AsyncSaliencyClient, serving: Any) -> None:
        self.args = args
        self.client = client
        hosted = serving.host.default
        self.model = hosted.engine.model
        self.workload = Workload(hosted.tokenizer)

    async def saliency(self, prompt: str, target: str, **kwargs: Any) -> tuple[Any, dict[str, float]]:
        kwargs.setdefault("methods", GRADIENT_METHODS)
        request = saliency_request(prompt=prompt, target=target, **kwargs)
        with measured() as m:
            response = await self.client.saliency(request)
        return response, m

    async def forward(self, prompt_ids: Sequence[int], target_ids: Sequence[int]) -> dict[str, float]:
        with measured() as m:
            await asyncio.to_thread(forward_pass, self.model, prompt_ids, target_ids)
        return m

    async def warm_up(self) -> None:
        prompt, target = self.workload.prompt(64), self.workload.target(self.args.target_tokens)
        await self.saliency(prompt, target)
        await self.forward(*self.workload.ids(prompt, target))

    async def size(self, n_prompt: int) -> SizeResult:
        target = self.workload.target(self.args.target_tokens)
        result = SizeResult(prompt_tokens=n_prompt, target_tokens=self.args.target_tokens)
        request: tuple[str, str] | None = None
        for repeat in range(self.args.repeats):
            prompt = self.workload.prompt(n_prompt)
            prompt_ids, target_ids = self.workload.ids(prompt, target)
            if len(prompt_ids) != n_prompt or len(target_ids) != self.args.target_tokens:
                raise RuntimeError(f"built {len(prompt_ids)} + {len(target_ids)} tokens, not the sizes asked")
            # alternate the order so that neither measurement always runs second
            if repeat % 2:
                response, miss = await self.saliency(prompt, target)
                fwd = await self.forward(prompt_ids, target_ids)
            else:
                fwd = await self.forward(prompt_ids, target_ids)
                response, miss = await self.saliency(prompt, target)
            if response.cache_hit:
                raise RuntimeError("a fresh prompt was answered from the cache")
            if [t.id for t in response.tokens] != prompt_ids + target_ids:
                raise RuntimeError("the server tokenised the prompt differently from the benchmark")
            result.forward_s.append(fwd["s"])
            result.forward_mib.append(fwd["mib"])
            result.miss_s.append(miss["s"])
            result.miss_mib.append(miss["mib"])
            result.miss_server_ms.append(response.server_time_ms)
            request = (prompt, target)
            console.log(
                f"{n_prompt:>5} tokens, repeat {repeat + 1}: forward {fwd['s'] * 1000:8.1f} ms, "
                f"saliency {miss['s'] * 1000:8.1f} ms ({ratio(miss['s'], fwd['s']):.2f}x), "
                f"peak RSS +{fwd['mib']:.0f} / +{miss['mib']:.0f} MiB"
            )
        assert request is not None
        for _ in range(self.args.hit_repeats):
            response, hit = await self.saliency(*request)
            if not response.cache_hit:
                raise RuntimeError("an identical repeated call was not answered from the cache")
            result.hit_s.append(hit["s"])
            result.hit_server_ms.append(response.server_time_ms)
        console.log(
            f"{n_prompt:>5} tokens: cache hit {result.hit_median_s * 1000:.2f} ms "
            f"({ratio(result.hit_median_s, result.miss_median_s):.4f}x the miss), cache_hit=True"
        )
        return result

    async def segments(self) -> SegmentsResult:
        n_prompt, n_target = self.args.segments_prompt_tokens, self.args.segments_target_tokens
        granularity = GRANULARITIES[self.args.granularity]
        target = self.workload.target(n_target)

        async def stream() -> tuple[list[list[bool]], dict[str, float]]:
            request = all_segments_request(
                prompt=self.workload.prompt(n_prompt),
                target=target,
                granularity=granularity,
                methods=GRADIENT_METHODS,
            )
            masks: list[list[bool]] = []
            with measured() as m:
                started = time.perf_counter()
                async for message in self.client.saliency_all_segments(request):
                    if not masks:
                        m["first_s"] = time.perf_counter() - started
                    if message.saliency.cache_hit:
                        raise RuntimeError("a fresh prompt was answered from the cache")
                    masks.append(list(message.saliency.target_mask))
            console.log(
                f"SaliencyAllSegments: {len(masks)} {self.args.granularity} in {m['s'] * 1000:.0f} ms "
                f"(first after {m['first_s'] * 1000:.0f} ms)"
            )
            return masks, m

        masks, before = await stream()
        prompt = self.workload.prompt(n_prompt)  # a new prompt: nothing of the streams is cached
        separate_s: list[float] = []
        separate_mib: list[float] = []
        for mask in masks:
            response, call = await self.saliency(prompt, target, target_mask=mask)
            if response.cache_hit:
                raise RuntimeError("a fresh prompt was answered from the cache")
            separate_s.append(call["s"])
            separate_mib.append(call["mib"])
        console.log(f"{len(masks)} separate Saliency calls: {sum(separate_s) * 1000:.0f} ms")
        _, after = await stream()
        result = SegmentsResult(
            prompt_tokens=n_prompt,
            target_tokens=n_target,
            granularity=self.args.granularity,
            segments=len(masks),
            stream_s=[before["s"], after["s"]],
            stream_first_s=[before["first_s"], after["first_s"]],
            stream_mib=[before["mib"], after["mib"]],
            separate_s=separate_s,
            separate_mib_max=max(separate_mib, default=float("nan")),
        )
        console.log(f"speed-up of the stream: {result.summary()['speedup']:.2f}x")
        return result

    async def ig(self) -> IgResult:
        n_prompt, steps = self.args.ig_prompt_tokens, self.args.ig_steps
        target = self.workload.target(self.args.target_tokens)
        # the reference: a gradient call on a new prompt of the same size, right before
        _, grad = await self.saliency(self.workload.prompt(n_prompt), target)
        response, ig = await self.saliency(
            self.workload.prompt(n_prompt), target, methods=[common_pb2.INTEGRATED_GRADIENTS], ig_steps=steps
        )
        if response.cache_hit:
            raise RuntimeError("a fresh prompt was answered from the cache")
        scores = response.scores[0]
        residual = scores.completeness_residual if scores.HasField("completeness_residual") else None
        console.log(
            f"IG ({steps} steps) at {n_prompt} tokens: {ig['s'] * 1000:.0f} ms "
            f"({ratio(ig['s'], grad['s']):.1f}x the gradient call timed before it), "
            f"peak RSS +{ig['mib']:.0f} MiB"
        )
        return IgResult(
            prompt_tokens=n_prompt,
            target_tokens=self.args.target_tokens,
            ig_steps=steps,
            ig_s=ig["s"],
            ig_mib=ig["mib"],
            gradient_s=grad["s"],
            gradient_mib=grad["mib"],
            completeness_residual=residual,
        )


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host_cpu": cpu,
        "cpu_cores": affinity,
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_start": list(os.getloadavg()),
    }


@contextlib.asynccontextmanager
async def saliency_server(settings: SaliencySettings) -> AsyncIterator[tuple[SaliencyServing, int]]:
    """A saliency server in this process on a free loopback port: its serving layer and port.

    On exit the server is stopped (0.5 s grace) and the serving layer and its cache are closed.
    """
    serving = await asyncio.to_thread(build_serving, settings)
    server = build_server(serving, settings)
    try:
        port = server.bind("127.0.0.1", 0)
        await server.start()
        yield serving, port
    finally:
        await server.stop(0.5)
        serving.close()
        await serving.cache.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine_info()
    settings_kwargs: dict[str, Any] = {
        "data_dir": args.data_dir,
        "redis_url": None,  # the in-process LRU cache
        "host": "127.0.0.1",
        "port": 0,
        "max_tokens": max(4096, max(args.sizes, default=0) + args.segments_target_tokens + 64),
        "log_level": "WARNING",
    }
    if args.model is not None:
        settings_kwargs["models"] = [str(args.model)]
    settings = SaliencySettings(**settings_kwargs)
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    async with saliency_server(settings) as (serving, port):
        model_info = serving.host.default.info
        info.update(
            model=model_info.id,
            model_revision=model_info.revision,
            dtype=model_info.dtype,
            device=model_info.device,
            model_load_s=round(time.perf_counter() - started, 2),
        )
        console.log(
            f"server on 127.0.0.1:{port}: {model_info.id} ({model_info.dtype} on {model_info.device}), "
            f"{info['cpu_cores']} cores, {info['torch_threads']} torch threads"
        )
        bench_started = time.perf_counter()
        async with AsyncSaliencyClient(f"127.0.0.1:{port}", timeout=3600.0) as client:
            bench = Bench(args, client, serving)
            await bench.warm_up()
            sizes: dict[int, SizeResult] = {}
            for n in args.sizes:
                sizes[n] = await bench.size(n)
            results["sizes"] = {str(n): {**asdict(r), "summary": r.summary()} for n, r in sizes.items()}
            if not args.skip_segments:
                seg = await bench.segments()
                results["segments"] = {**asdict(seg), "summary": seg.summary()}
            if not args.skip_ig:
                ig = await bench.ig()
                results["ig"] = {**asdict(ig), "summary": ig.summary()}
    info["bench_s"] = round(time.perf_counter() - bench_started, 1)
    info["load_average_end"] = list(os.getloadavg())
    return results


# --- report -------------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> None:
    info = results["machine"]
    console.rule("seqsal saliency benchmark")
    console.print(
        f"{info['date']}  {info['model']} ({info['dtype']} on {info['device']})  "
        f"{info['host_cpu']}, {info['cpu_cores']} cores, {info['torch_threads']} torch threads  "
        f"torch {info['torch']}  load avg {info['load_average_start'][0]:.1f} -> "
        f"{info['load_average_end'][0]:.1f}  ({info['bench_s']:.0f} s)"
    )

    sizes = results.get("sizes", {})
    if sizes:
        latency = Table(
            title="Saliency latency (GRAD_L2 + GRAD_DOT_INPUT, cache miss, median of repeats)",
            caption="paired ratio: median over repeats of (call / no-grad forward timed right beside it)",
        )
        for column in ("prompt", "target", "forward ms", "saliency ms", "saliency / forward", "paired ratio"):
            latency.add_column(column, justify="right")
        cache = Table(title="Cache hits (identical repeated call, in-process LRU)")
        for column in ("prompt", "miss ms", "hit ms", "hit / miss", "hit server ms"):
            cache.add_column(column, justify="right")
        memory = Table(title="Peak RSS increase during one call (max over repeats)")
        for column in ("prompt", "forward MiB", "saliency MiB", "saliency / forward"):
            memory.add_column(column, justify="right")
        for n, entry in sizes.items():
            s = entry["summary"]
            latency.add_row(
                n,
                str(entry["target_tokens"]),
                f"{s['forward_median_ms']:.1f}",
                f"{s['miss_median_ms']:.1f}",
                f"{s['miss_over_forward']:.2f}x",
                f"{s['miss_over_forward_paired']:.2f}x",
            )
            cache.add_row(
                n,
                f"{s['miss_median_ms']:.1f}",
                f"{s['hit_median_ms']:.2f}",
                f"{s['hit_over_miss']:.4f}",
                f"{median(entry['hit_server_ms']):.2f}",
            )
            memory.add_row(
                n,
                f"{s['forward_peak_mib']:.1f}",
                f"{s['miss_peak_mib']:.1f}",
                f"{s['miss_mib_over_forward_mib']:.2f}x",
            )
        console.print(latency, cache, memory)

    if "segments" in results:
        seg = results["segments"]
        s = seg["summary"]
        table = Table(
            title=(
                f"SaliencyAllSegments vs one Saliency call per segment ({seg['prompt_tokens']}-token prompt, "
                f"{seg['target_tokens']}-token target, {seg['segments']} {seg['granularity']})"
            ),
            caption="stream: mean of two calls, one before and one after the separate calls",
        )
        for column in ("stream ms", "first segment ms", "separate calls ms", "speed-up", "stream / sep. MiB"):
            table.add_column(column, justify="right")
        table.add_row(
            f"{s['stream_ms']:.0f}",
            f"{s['stream_first_segment_ms']:.0f}",
            f"{s['separate_total_ms']:.0f}",
            f"{s['speedup']:.2f}x",
            f"{s['stream_peak_mib']:.0f} / {s['separate_peak_mib']:.0f}",
        )
        console.print(table)

    if "ig" in results:
        ig = results["ig"]
        table = Table(
            title=f"Integrated gradients ({ig['prompt_tokens']}-token prompt, 1 call)",
            caption="gradient: a GRAD_L2 + GRAD_DOT_INPUT call on a new prompt of the same size, just before",
        )
        columns = ("ig_steps", "IG ms", "gradient ms", "IG / gradient", "IG / gradient MiB", "residual")
        for column in columns:
            table.add_column(column, justify="right")
        residual = ig["completeness_residual"]
        table.add_row(
            str(ig["ig_steps"]),
            f"{ig['ig_s'] * 1000:.0f}",
            f"{ig['gradient_s'] * 1000:.0f}",
            f"{ig['summary']['ig_over_gradient']:.1f}x",
            f"{ig['ig_mib']:.0f} / {ig['gradient_mib']:.0f}",
            "-" if residual is None else f"{residual:.3g}",
        )
        console.print(table)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    def sizes(text: str) -> list[int]:
        return [int(part) for part in text.split(",") if part.strip()]

    parser = argparse.ArgumentParser(prog="bench_saliency.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=sizes, default=[128, 512, 2048], help="prompt sizes in tokens")
    parser.add_argument("--repeats", type=int, default=3, help="cache-miss calls per size (median)")
    parser.add_argument("--hit-repeats", type=int, default=5, help="cache-hit calls per size (median)")
    parser.add_argument("--target-tokens", type=int, default=16, help="target length of sections 1, 3-5")
    parser.add_argument("--json", type=Path, default=None, help="also write every raw number here")
    parser.add_argument("--model", type=Path, default=None, help="HF model directory (default model)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".data", help="seqsal data dir")
    parser.add_argument("--granularity", choices=sorted(GRANULARITIES), default="words")
    parser.add_argument("--segments-prompt-tokens", type=int, default=512)
    parser.add_argument("--segments-target-tokens", type=int, default=40)
    parser.add_argument("--skip-segments", action="store_true", help="skip the all-segments comparison")
    parser.add_argument("--ig-prompt-tokens", type=int, default=512)
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--skip-ig", action="store_true", help="skip the integrated-gradients call")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.hit_repeats < 1:
        parser.error("--repeats and --hit-repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = asyncio.run(run(args))
    report(results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"raw results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
