"""Benchmark of the saliency server's scheduling on the default model through a real gRPC server.

Run from the repository root::

    .venv/bin/python bench/bench_scheduler.py [--repeats 3] [--clients 1,2,4,8] [--json out.json]

A SaliencyService gRPC server is started in this process on a free port (``build_serving`` /
``build_server``, as ``seqsal serve saliency``, in-process LRU cache); every client below is its
own :class:`~seqsal.client.AsyncSaliencyClient` (its own connection, so the server sees distinct
clients). Every computed call uses a new prompt (a cache miss). Ratios are taken against a
reference measured in the same run, so they stay meaningful on a busy machine:

1. **A click during another client's precompute.** Click = ``Saliency`` (GRAD_L2 +
   GRAD_DOT_INPUT, whole target) on a ~150-token prompt. Its median latency alone, then during
   another client's ``SaliencyAllSegments`` (background priority) over the word segments of a
   ~650-token prompt (22 by default) started ``--head-start`` seconds earlier: the ratio
   (goal: <= 1.2x). The precompute must still complete, with the same scores as the same
   computation run directly on the engine with nobody else around (max abs difference).
2. **N concurrent clients** (``--clients``), each clicking ``--clicks`` different prompts in a
   row: throughput (clicks/s) and p50/p95 latency, against N = 1, with cross-request batching
   off and on (``--batch-wait-ms``).
3. **A lone user with batching on**: the N = 1 row with batching on against the one with it
   off (a lone click waits the bounded wait at most).
4. **Padded batching on the raw model**: N clicks' forward + backward passes as one
   right-padded batch against the same N one after the other: time ratio, and the largest
   relative difference of the gradients (right padding must not change them).

This is a benchmark, not a test: CI never runs it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.bench_saliency import Workload, machine_info, median, ratio, saliency_server  # noqa: E402
from saliency_server.settings import SaliencySettings  # noqa: E402
from seqsal import segmentation  # noqa: E402
from seqsal.client import AsyncSaliencyClient, all_segments_request, saliency_request  # noqa: E402
from seqsal.v1 import common_pb2  # noqa: E402
from server_kit.tokenization import tokenize  # noqa: E402

console = Console()
METHODS = (common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def target_with_segments(tokenizer: Any, workload: Workload, segments: int) -> str:
    """The shortest benchmark target with ``segments`` word segments."""
    for n_tokens in range(segments, 4 * segments):
        text = workload.target(n_tokens)
        tokens = tokenize(tokenizer, text, part=common_pb2.TARGET, add_special_tokens=False)
        words = segmentation.segment_tokens(tokens, common_pb2.WORDS, "")
        if len(words) >= segments:
            return text
    raise ValueError(f"no target with {segments} word segments")


class Bench:
    def __init__(self, args: argparse.Namespace, address: str, serving: Any) -> None:
        self.args = args
        self.address = address
        self.serving = serving
        self.tokenizer = serving.host.default.tokenizer
        self.workload = Workload(self.tokenizer)
        self.click_target = self.workload.target(args.click_target_tokens)

    def client(self) -> AsyncSaliencyClient:
        return AsyncSaliencyClient(self.address, timeout=3600.0)

    async def click(self, client: AsyncSaliencyClient) -> float:
        prompt = self.workload.prompt(self.args.click_prompt_tokens)
        started = time.perf_counter()
        response = await client.saliency(
            saliency_request(prompt=prompt, target=self.click_target, methods=METHODS)
        )
        assert not response.cache_hit
        return time.perf_counter() - started

    async def clicks_alone(self, client: AsyncSaliencyClient) -> list[float]:
        return [await self.click(client) for _ in range(self.args.repeats)]

    async def during_precompute(self, clicker: AsyncSaliencyClient) -> dict[str, Any]:
        prompt = self.workload.prompt(self.args.precompute_prompt_tokens)
        target = target_with_segments(self.tokenizer, self.workload, self.args.segments)
        request = all_segments_request(
            prompt=prompt, target=target, granularity=common_pb2.WORDS, methods=METHODS
        )
        async with self.client() as other:
            started = time.perf_counter()

            async def precompute() -> tuple[list[Any], float]:
                messages = [m async for m in other.saliency_all_segments(request)]
                return messages, time.perf_counter() - started

            task = asyncio.create_task(precompute())
            await asyncio.sleep(self.args.head_start)
            clicks = []
            for _ in range(self.args.repeats):
                if task.done():
                    console.log("[yellow]the precompute finished before the clicks; raise --segments")
                    break
                clicks.append(await self.click(clicker))
            messages, precompute_s = await task
        difference, quiet_s = await asyncio.to_thread(self.quiet_reference, request, messages)
        return {
            "click_s": clicks,
            "precompute_s": precompute_s,
            "precompute_quiet_s": quiet_s,
            "segments": len(messages),
            "prompt_tokens": sum(1 for t in messages[0].saliency.tokens if t.part == common_pb2.PROMPT),
            "max_abs_difference": difference,
        }

    def quiet_reference(self, request: Any, messages: list[Any]) -> tuple[float, float]:
        """The same segments computed directly on the engine (nobody else around): max |diff|, seconds."""
        hosted = self.serving.host.default
        loop = asyncio.new_event_loop()
        try:
            problem = loop.run_until_complete(self.serving._problem(request, all_segments=True))
        finally:
            loop.close()
        targets = segmentation.segment_target_masks(problem.tokens, problem.segments)
        masks = np.asarray([mask for _, mask in targets], dtype=bool)
        started = time.perf_counter()
        results = list(hosted.engine.saliency_batch(problem.inputs, masks, list(METHODS)))
        seconds = time.perf_counter() - started
        worst = 0.0
        for message in messages:
            expected = results[message.segment_index]
            for scores in message.saliency.scores:
                got = np.asarray(scores.scores, dtype=np.float32)
                worst = max(worst, float(np.abs(got - expected.scores[scores.method]).max()))
        return worst, seconds

    async def concurrent(self, n: int) -> dict[str, Any]:
        clients = [self.client() for _ in range(n)]
        latencies: list[float] = []

        async def user(client: AsyncSaliencyClient) -> None:
            for _ in range(self.args.clicks):
                latencies.append(await self.click(client))

        started = time.perf_counter()
        try:
            await asyncio.gather(*(user(c) for c in clients))
        finally:
            for client in clients:
                await client.close()
        wall = time.perf_counter() - started
        return {
            "clients": n,
            "clicks": len(latencies),
            "wall_s": wall,
            "throughput_per_s": len(latencies) / wall,
            "p50_s": percentile(latencies, 50),
            "p95_s": percentile(latencies, 95),
        }


def click_gradients(model: Any, rows: Sequence[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """d(sum of target log-probs)/d(input embeddings) of each (prompt ids, target ids) row, computed
    as one right-padded batch (the engine's objective, one forward and one backward)."""
    embed = model.get_input_embeddings()
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    weights = torch.zeros(len(rows), width - 1)
    for b, (prompt, target) in enumerate(rows):
        n = len(prompt) + len(target)
        ids[b, :n] = torch.tensor(prompt + target)
        attention[b, :n] = 1
        weights[b, len(prompt) - 1 : n - 1] = 1.0  # positions that predict the target tokens
    with torch.no_grad():
        leaf = embed(ids)
    leaf.requires_grad_(True)
    logits = model(inputs_embeds=leaf, attention_mask=attention, use_cache=False).logits[:, :-1]
    token_lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    (grads,) = torch.autograd.grad(token_lp, leaf, grad_outputs=weights)
    return [grads[b, : len(p) + len(t)] for b, (p, t) in enumerate(rows)]


def batching_potential(bench: Bench, sizes: Sequence[int]) -> list[dict[str, float]]:
    model = bench.serving.host.default.engine.model
    out = []
    for n in sizes:
        rows = []
        for _ in range(n):
            prompt = bench.workload.prompt(bench.args.click_prompt_tokens)
            rows.append(bench.workload.ids(prompt, bench.click_target))
        started = time.perf_counter()
        singles = [click_gradients(model, [row])[0] for row in rows]
        one_by_one = time.perf_counter() - started
        started = time.perf_counter()
        batched = click_gradients(model, rows)
        together = time.perf_counter() - started
        worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(batched, singles, strict=True))
        out.append({"n": n, "one_by_one_s": one_by_one, "batched_s": together, "max_rel_difference": worst})
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine_info()
    settings_kwargs: dict[str, Any] = {
        "data_dir": args.data_dir,
        "redis_url": None,
        "host": "127.0.0.1",
        "port": 0,
        "log_level": "WARNING",
        "max_queue": max(16, 2 * max(args.clients, default=1)),
        "metrics_port": 0,
    }
    if args.model is not None:
        settings_kwargs["models"] = [str(args.model)]
    settings = SaliencySettings(**settings_kwargs)
    async with saliency_server(settings) as (serving, port):
        model = serving.host.default.info
        info.update(model=model.id, dtype=model.dtype, device=model.device)
        console.log(f"server on 127.0.0.1:{port}: {model.id} ({model.dtype} on {model.device})")
        results: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
        bench = Bench(args, f"127.0.0.1:{port}", serving)
        bench_started = time.perf_counter()
        async with bench.client() as clicker:
            await bench.click(clicker)  # warm-up
            alone = await bench.clicks_alone(clicker)
            console.log(f"click alone: {[round(x, 2) for x in alone]} s")
            during = await bench.during_precompute(clicker)
            console.log(f"click during the precompute: {[round(x, 2) for x in during['click_s']]} s")
        results["click"] = {
            "alone_s": alone,
            **during,
            "summary": {
                "alone_ms": median(alone) * 1000,
                "during_ms": median(during["click_s"]) * 1000,
                "during_over_alone": ratio(median(during["click_s"]), median(alone)),
                "precompute_over_quiet": ratio(during["precompute_s"], during["precompute_quiet_s"]),
            },
        }
        scheduler = serving.schedulers[model.id]
        results["click"]["preemptions"] = {p.label: n for p, n in scheduler.preemptions.items()}
        results["concurrent"] = []
        for wait_ms in (0.0, args.batch_wait_ms):
            serving.batch_wait_s = wait_ms / 1000.0  # cross-request batching off, then on
            for n in args.clients:
                row = {**await bench.concurrent(n), "batch_wait_ms": wait_ms}
                console.log(f"{n} clients, batch wait {wait_ms} ms: {row}")
                results["concurrent"].append(row)
        serving.batch_wait_s = 0.0
        if args.batch_sizes:
            results["batching"] = await asyncio.to_thread(batching_potential, bench, args.batch_sizes)
    info["bench_s"] = round(time.perf_counter() - bench_started, 1)
    info["load_average_end"] = list(os.getloadavg())
    return results


def report(results: dict[str, Any]) -> None:
    info = results["machine"]
    console.rule("seqsal scheduler benchmark")
    console.print(
        f"{info['model']} ({info['dtype']} on {info['device']}), {info['cpu_cores']} cores, "
        f"{info['torch_threads']} torch threads, torch {info['torch']}, load {info['load_average_start']}"
    )
    click = results["click"]
    summary = click["summary"]
    table = Table(title="1. A click during another client's precompute")
    for column in ("", "value"):
        table.add_column(column, justify="right")
    table.add_row("click alone (median)", f"{summary['alone_ms']:.0f} ms")
    table.add_row(
        f"click during a {click['segments']}-segment precompute of {click['prompt_tokens']} tokens",
        f"{summary['during_ms']:.0f} ms",
    )
    table.add_row("during / alone", f"{summary['during_over_alone']:.2f}x")
    table.add_row("precompute (with the clicks)", f"{click['precompute_s']:.1f} s")
    table.add_row("precompute / the same on a quiet engine", f"{summary['precompute_over_quiet']:.2f}x")
    table.add_row("precompute scores: max |difference|", f"{click['max_abs_difference']:.2e}")
    table.add_row("preemptions", str(click["preemptions"]))
    console.print(table)
    table = Table(
        title="2./3. N concurrent clients clicking different prompts, cross-request batching off and on",
        caption="vs: against N = 1 with batching off (N = 1 with batching on is a lone user's latency)",
    )
    for column in ("batch wait", "clients", "clicks", "clicks/s", "vs", "p50 ms", "p95 ms", "p50 vs"):
        table.add_column(column, justify="right")
    base = results["concurrent"][0] if results["concurrent"] else None
    for row in results["concurrent"]:
        table.add_row(
            f"{row['batch_wait_ms']:g} ms",
            str(row["clients"]),
            str(row["clicks"]),
            f"{row['throughput_per_s']:.2f}",
            f"{ratio(row['throughput_per_s'], base['throughput_per_s']):.2f}x" if base else "-",
            f"{row['p50_s'] * 1000:.0f}",
            f"{row['p95_s'] * 1000:.0f}",
            f"{ratio(row['p50_s'], base['p50_s']):.2f}x" if base else "-",
        )
    console.print(table)
    if results.get("batching"):
        table = Table(title="4. N clicks as one padded batch on the raw model")
        for column in ("N", "one by one ms", "one batch ms", "speed-up", "max rel. difference"):
            table.add_column(column, justify="right")
        for row in results["batching"]:
            table.add_row(
                str(row["n"]),
                f"{row['one_by_one_s'] * 1000:.0f}",
                f"{row['batched_s'] * 1000:.0f}",
                f"{ratio(row['one_by_one_s'], row['batched_s']):.2f}x",
                f"{row['max_rel_difference']:.1e}",
            )
        console.print(table)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(part) for part in text.split(",") if part.strip()]

    parser = argparse.ArgumentParser(prog="bench_scheduler.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="clicks alone and during the precompute")
    parser.add_argument("--click-prompt-tokens", type=int, default=150)
    parser.add_argument("--click-target-tokens", type=int, default=16)
    parser.add_argument("--precompute-prompt-tokens", type=int, default=650)
    parser.add_argument("--segments", type=int, default=22, help="word segments of the precompute")
    parser.add_argument("--head-start", type=float, default=3.0, help="seconds the precompute runs first")
    parser.add_argument("--clients", type=ints, default=[1, 2, 4, 8], help="concurrent clients (section 2)")
    parser.add_argument("--clicks", type=int, default=2, help="clicks per client in section 2")
    parser.add_argument("--batch-wait-ms", type=float, default=50.0, help="SEQSAL_BATCH_WAIT_MS when on")
    parser.add_argument("--batch-sizes", type=ints, default=[4], help="section 4; empty = skip")
    parser.add_argument("--model", type=Path, default=None, help="HF model directory (default model)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".data", help="seqsal data dir")
    parser.add_argument("--json", type=Path, default=None, help="also write every raw number here")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    return parser.parse_args(argv)


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
