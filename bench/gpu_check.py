"""GPU check: the saliency engine and server on CUDA, on randomly initialised models built from configs.

Written for a short loan of one H200 (torch with CUDA, transformers and grpcio there; nothing
downloadable; no weights travel), see bench/README.md. Four parts, each timed and written into
one JSON file and one Markdown table:

a. precision: GRAD_L2, GRAD_DOT_INPUT and INTEGRATED_GRADIENTS in bfloat16 and float16 against
   float32 on the same ids (relative L2 error, top-10 overlap), for a SmolLM2-135M-shaped and a
   Llama-3-8B-shaped model;
b. long prompts (8B shape, bf16): time and peak GPU memory of one Saliency computation and of
   SaliencyAllSegments (a batch of target segments) against prompt length, and the ratio against
   the forward pass alone; an out-of-memory length is recorded as such;
c. concurrency: 1, 4 and 16 concurrent Saliency calls to the serving layer (whatever scheduling
   it does), throughput and its ratio against one at a time;
d. the gRPC saliency server started as a process (``seqsal serve saliency --dtype bfloat16``) on a
   saved random SmolLM2-shaped model, answering one Saliency call.

``--cpu-smoke`` runs all of it on the CPU with tiny shapes and sizes (float32 for the server,
which refuses half precision on CPU); the test suite runs that. Time is bounded: a part that
would start after ``--budget-s`` seconds is recorded as skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import gc
import inspect
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # seqsal, and tests/tiny_models.py for a tokenizer

import numpy as np  # noqa: E402
import torch  # noqa: E402

from saliency_server.engine import GradientEngine, SaliencyInputs  # noqa: E402
from seqsal.v1 import common_pb2  # noqa: E402

METHODS = (common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT, common_pb2.INTEGRATED_GRADIENTS)
METHOD_NAMES = {m: common_pb2.Method.Name(m) for m in METHODS}
SEED = 1234

# Shapes of the real models (random weights): Llama-architecture configs.
FULL_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    },
}
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 1024,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
    },
    "llama3-8b": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 2048,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
    },
}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run."""

    device: str
    shapes: dict[str, dict[str, Any]]
    precision_prompt: int
    target: int
    ig_steps: int
    lengths: tuple[int, ...]
    segments: int
    concurrency: tuple[int, ...]
    concurrency_prompt: int
    server_dtype: str
    low_dtypes: tuple[str, ...] = ("bfloat16", "float16")


GPU_PLAN = Plan(
    device="cuda",
    shapes=FULL_SHAPES,
    precision_prompt=512,
    target=16,
    ig_steps=8,
    lengths=(2048, 8192, 16384, 32768),
    segments=4,
    concurrency=(1, 4, 16),
    concurrency_prompt=1024,
    server_dtype="bfloat16",
)
# The same parts with tiny sizes on the CPU (the server refuses half precision there).
SMOKE_PLAN = replace(
    GPU_PLAN,
    device="cpu",
    shapes=SMOKE_SHAPES,
    precision_prompt=48,
    target=8,
    ig_steps=4,
    lengths=(32, 64, 128, 256),
    concurrency_prompt=32,
    server_dtype="float32",
)


# --- models and measurements -----------------------------------------------------------------------


def build_model(shape: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    """A random Llama model of ``shape``: the same weights for the same seed, cast to ``dtype``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, initializer_range=0.02, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[] if device == "cpu" else [torch.cuda.current_device()]):
        torch.manual_seed(SEED)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def checkpointing_kwargs() -> dict[str, Any]:
    """Turn on the engine's gradient checkpointing where it has such an option (long-prompts work)."""
    parameters = inspect.signature(GradientEngine.__init__).parameters
    for name in ("checkpointing", "gradient_checkpointing"):
        if name in parameters:
            return {name: True}
    return {}


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    generator = np.random.default_rng(seed)
    return [int(i) for i in generator.integers(3, vocab, size=n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def measured(device: str) -> Iterator[dict[str, float]]:
    """Wall seconds and (CUDA) peak allocated GiB above what was allocated before."""
    out: dict[str, float] = {}
    if device.startswith("cuda"):  # (gc.collect takes ~1 s with transformers loaded: GPU runs only)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    yield out
    sync(device)
    out["seconds"] = time.perf_counter() - started
    if device.startswith("cuda"):
        out["peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_memory(device: str) -> None:
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()


def relative_error(low: np.ndarray, ref: np.ndarray) -> float:
    denominator = float(np.linalg.norm(ref))
    return float(np.linalg.norm(low.astype(np.float64) - ref)) / denominator if denominator else math.nan


def top_overlap(low: np.ndarray, ref: np.ndarray, k: int = 10) -> float:
    k = min(k, len(ref))
    top = lambda values: set(np.argsort(-np.abs(values))[:k].tolist())  # noqa: E731
    return len(top(low) & top(ref)) / k


# --- a. precision ---------------------------------------------------------------------------------


def check_precision(plan: Plan) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, shape in plan.shapes.items():
        prompt = random_ids(plan.precision_prompt, shape["vocab_size"], 1)
        target = random_ids(plan.target, shape["vocab_size"], 2)
        inputs = SaliencyInputs(prompt_ids=prompt, target_ids=target)
        mask = [True] * len(target)
        scores: dict[str, dict[int, np.ndarray]] = {}
        seconds: dict[str, float] = {}
        reference_model = build_model(shape, plan.device, torch.float32)
        for dtype_name in ("float32", *plan.low_dtypes):
            # The low-precision models are the float32 one cast (a copy: 8B fp32 + a copy fit an H200).
            model = reference_model if dtype_name == "float32" else copy.deepcopy(reference_model)
            model.to(getattr(torch, dtype_name))
            engine = GradientEngine(model)
            try:
                with measured(plan.device) as m:
                    result = engine.saliency(inputs, mask, METHODS, ig_steps=plan.ig_steps)
                scores[dtype_name] = {k: np.asarray(v, dtype=np.float64) for k, v in result.scores.items()}
                seconds[dtype_name] = m["seconds"]
            except Exception as error:  # a dtype that does not run here is a finding, not a crash
                scores[dtype_name] = {}
                seconds[dtype_name] = math.nan
                rows.append({"shape": name, "dtype": dtype_name, "error": f"{type(error).__name__}: {error}"})
            del engine, model
            free_memory(plan.device)
        del reference_model
        free_memory(plan.device)
        reference = scores["float32"]
        for dtype_name in plan.low_dtypes:
            if not scores.get(dtype_name) or not reference:
                continue
            for method in METHODS:
                low, ref = scores[dtype_name][method], reference[method]
                rows.append(
                    {
                        "shape": name,
                        "dtype": dtype_name,
                        "method": METHOD_NAMES[method],
                        "relative_error": relative_error(low, ref),
                        "top10_overlap": top_overlap(low, ref),
                        "finite": bool(np.all(np.isfinite(low))),
                        "seconds": seconds[dtype_name],
                        "float32_seconds": seconds["float32"],
                    }
                )
    return rows


# --- b. long prompts ------------------------------------------------------------------------------


def _forward(model: Any, ids: list[int], device: str, keep: int) -> None:
    """The forward pass alone, as the engine runs it (logits of the target positions only)."""
    with torch.no_grad():
        model(input_ids=torch.tensor([ids], device=device), logits_to_keep=keep, use_cache=False)


def check_long_prompts(plan: Plan, deadline: float) -> dict[str, Any]:
    shape = plan.shapes["llama3-8b"]
    dtype = torch.bfloat16 if plan.device != "cpu" else torch.float32
    model = build_model(shape, plan.device, dtype)
    extra = checkpointing_kwargs()
    engine = GradientEngine(model, segment_batch_size=plan.segments, **extra)
    rows: list[dict[str, Any]] = []
    failed: set[str] = set()
    keep = plan.target + 1
    for length in plan.lengths:
        row: dict[str, Any] = {"prompt_tokens": length, "target_tokens": plan.target}
        rows.append(row)
        if time.monotonic() > deadline:
            row["skipped"] = "time budget"
            continue
        prompt = random_ids(length, shape["vocab_size"], length)
        target = random_ids(plan.target, shape["vocab_size"], length + 1)
        inputs = SaliencyInputs(prompt_ids=prompt, target_ids=target)
        per = plan.target // plan.segments
        masks = np.zeros((plan.segments, plan.target), dtype=bool)
        for k in range(plan.segments):
            masks[k, k * per : (k + 1) * per] = True

        runs: dict[str, Callable[[], Any]] = {
            "forward": lambda ids=prompt + target: _forward(model, ids, plan.device, keep),
            "saliency": lambda inputs=inputs: engine.saliency(inputs, [True] * plan.target, METHODS[:2]),
            "all_segments": lambda inputs=inputs, masks=masks: list(
                engine.saliency_batch(inputs, masks, METHODS[:2])
            ),
        }
        for label, run in runs.items():
            if label in failed:
                row[label] = "OOM at a shorter prompt"
                continue
            try:
                with measured(plan.device) as m:
                    run()
                row[label] = m
            except Exception as error:
                if not is_oom(error):
                    raise
                failed.add(label)
                row[label] = "OOM"
            free_memory(plan.device)
        for label in ("saliency", "all_segments"):
            if isinstance(row.get(label), dict) and isinstance(row.get("forward"), dict):
                row[f"{label}_over_forward"] = row[label]["seconds"] / row["forward"]["seconds"]
                if "peak_gib" in row[label]:
                    row[f"{label}_memory_over_forward"] = row[label]["peak_gib"] / max(
                        row["forward"]["peak_gib"], 1e-9
                    )
    return {
        "shape": "llama3-8b",
        "dtype": str(dtype).removeprefix("torch."),
        "engine_options": extra,
        "segments": plan.segments,
        "rows": rows,
    }


# --- c. concurrency through the serving layer -----------------------------------------------------


def _tokenizer() -> Any:
    from tiny_models import build_tokenizer

    return build_tokenizer("llama")


def _prompt_text(words: int, seed: int) -> str:
    from tiny_models import CORPUS

    vocabulary = CORPUS.split()
    generator = np.random.default_rng(seed)
    return f"Request {seed}: " + " ".join(
        vocabulary[i] for i in generator.integers(0, len(vocabulary), words)
    )


def check_concurrency(plan: Plan, deadline: float) -> dict[str, Any]:
    from saliency_server.cache import make_cache
    from saliency_server.model_host import HostedModel, ModelHost
    from saliency_server.serving import SaliencyServing
    from saliency_server.settings import SaliencySettings
    from seqsal.v1 import saliency_pb2
    from server_kit.model_registry import ModelSpec

    shape = plan.shapes["llama3-8b"]
    dtype = torch.bfloat16 if plan.device != "cpu" else torch.float32
    tokenizer = _tokenizer()
    model = build_model(shape, plan.device, dtype)
    settings = SaliencySettings(max_queue=max(plan.concurrency) * 2, redis_url=None, max_tokens=1 << 20)
    hosted = HostedModel(
        spec=ModelSpec(id="random-8b", path=Path("/nonexistent")),
        tokenizer=tokenizer,
        engine=GradientEngine(model, ig_batch_size=settings.ig_batch_size, **checkpointing_kwargs()),
        info=common_pb2.ModelInfo(
            id="random-8b", revision="random", architecture=type(model).__name__, max_tokens=1 << 20
        ),
        load_seconds=0.0,
    )
    serving = SaliencyServing(ModelHost([hosted]), make_cache(settings), settings)
    counter = iter(range(1, 1 << 30))

    def request() -> Any:
        return saliency_pb2.SaliencyRequest(
            prompt=_prompt_text(plan.concurrency_prompt, next(counter)),
            target=" The capital of France is Paris.",
            methods=[common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT],
        )

    async def run_batch(n: int) -> tuple[float, list[Any]]:
        requests = [request() for _ in range(n)]
        started = time.perf_counter()
        responses = await asyncio.gather(*(serving.saliency(r) for r in requests))
        return time.perf_counter() - started, list(responses)

    async def main() -> list[dict[str, Any]]:
        await run_batch(1)  # warm-up
        rows = []
        for n in plan.concurrency:
            if time.monotonic() > deadline:
                rows.append({"concurrent": n, "skipped": "time budget"})
                continue
            seconds, responses = await run_batch(n)
            if any(r.cache_hit for r in responses):
                raise RuntimeError("a concurrency request was answered from the cache")
            rows.append(
                {
                    "concurrent": n,
                    "seconds": seconds,
                    "requests_per_s": n / seconds,
                    "tokens_per_request": len(responses[0].tokens),
                }
            )
        single = next((r for r in rows if r.get("concurrent") == 1 and "requests_per_s" in r), None)
        for row in rows:
            if single and "requests_per_s" in row:
                row["throughput_over_single"] = row["requests_per_s"] / single["requests_per_s"]
        return rows

    try:
        rows = asyncio.run(main())
    finally:
        serving.close()
    return {"shape": "llama3-8b", "dtype": str(dtype).removeprefix("torch."), "rows": rows}


# --- d. the gRPC server ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_server(plan: Plan, workdir: Path) -> dict[str, Any]:
    from seqsal.client import SaliencyClient
    from seqsal_cli.stack import grpc_serving

    model_dir = workdir / "random-smollm2"
    tokenizer = _tokenizer()
    model = build_model(plan.shapes["smollm2-135m"], "cpu", torch.float32)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    port = _free_port()
    address = f"127.0.0.1:{port}"
    device = "cuda" if plan.device != "cpu" else "cpu"
    command = [
        sys.executable,
        "-m",
        "seqsal_cli",
        "serve",
        "saliency",
        "--model",
        f"random={model_dir}",
        "--device",
        device,
        "--dtype",
        plan.server_dtype,
        "--port",
        str(port),
        "--metrics-port",
        "0",
    ]
    log_path = workdir / "server.log"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    result: dict[str, Any] = {"command": " ".join(command[1:])}
    try:
        while not grpc_serving(address):
            if process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {process.returncode}: {log_path.read_text()[-2000:]}"
                )
            if time.perf_counter() - started > 240:
                raise RuntimeError(f"the server was not serving after 240 s: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        result["start_seconds"] = time.perf_counter() - started
        with SaliencyClient(address) as client:
            call_started = time.perf_counter()
            response = client.saliency(
                prompt=_prompt_text(64, 7),
                target=" The capital of France is Paris.",
                methods=list(METHODS[:2]),
            )
            result["call_seconds"] = time.perf_counter() - call_started
        scores = np.asarray(response.scores[0].scores)
        result |= {
            "answered": True,
            "dtype": response.dtype,
            "device": response.device,
            "tokens": len(response.tokens),
            "scores_finite": bool(np.all(np.isfinite(scores))),
        }
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            result["exit_code"] = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            result["exit_code"] = process.wait()
    return result


# --- report ---------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check ({'CPU smoke run' if report['cpu_smoke'] else 'GPU run'})",
        "",
        f"{env['device_name']} · torch {env['torch']} · transformers {env['transformers']} · "
        f"Python {env['python']} · {env['date']} · {report['total_seconds']:.0f} s",
        "",
        "## a. Precision against float32 (same ids, random weights)",
        "",
        "| shape | dtype | method | relative L2 error | top-10 overlap | finite | s (vs fp32 s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["precision"]:
        if "error" in row:
            lines.append(f"| {row['shape']} | {row['dtype']} | - | {row['error']} | | | |")
            continue
        lines.append(
            f"| {row['shape']} | {row['dtype']} | {row['method']} | {_fmt(row['relative_error'])} | "
            f"{_fmt(row['top10_overlap'], 2)} | {row['finite']} | "
            f"{_fmt(row['seconds'])} ({_fmt(row['float32_seconds'])}) |"
        )
    long = report["long_prompts"]
    lines += [
        "",
        f"## b. Long prompts ({long.get('shape')}, {long.get('dtype')}, engine options "
        f"{long.get('engine_options') or 'none'}, {long.get('segments')} target segments)",
        "",
        "| prompt tokens | forward s / GiB | Saliency s / GiB | x forward (time, mem) | "
        "AllSegments s / GiB | x forward (time, mem) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def cell(value: Any) -> str:
        if isinstance(value, dict):
            return f"{_fmt(value['seconds'])} / {_fmt(value.get('peak_gib', math.nan))}"
        return str(value or "")

    for row in long.get("rows", []):
        if "skipped" in row:
            lines.append(f"| {row['prompt_tokens']} | skipped ({row['skipped']}) | | | | |")
            continue
        ratios = [
            f"{_fmt(row.get(f'{k}_over_forward', math.nan))}, "
            f"{_fmt(row.get(f'{k}_memory_over_forward', math.nan))}"
            for k in ("saliency", "all_segments")
        ]
        lines.append(
            f"| {row['prompt_tokens']} | {cell(row.get('forward'))} | {cell(row.get('saliency'))} | "
            f"{ratios[0]} | {cell(row.get('all_segments'))} | {ratios[1]} |"
        )
    conc = report["concurrency"]
    lines += [
        "",
        f"## c. Concurrent Saliency calls to the serving layer ({conc.get('shape')}, {conc.get('dtype')})",
        "",
        "| concurrent | wall s | requests/s | x one at a time | tokens/request |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in conc.get("rows", []):
        if "skipped" in row:
            lines.append(f"| {row['concurrent']} | skipped ({row['skipped']}) | | | |")
            continue
        lines.append(
            f"| {row['concurrent']} | {_fmt(row['seconds'])} | {_fmt(row['requests_per_s'])} | "
            f"{_fmt(row.get('throughput_over_single', math.nan))} | {row['tokens_per_request']} |"
        )
    server = report["server"]
    lines += [
        "",
        "## d. gRPC saliency server",
        "",
        "| answered | dtype | device | start s | call s | scores finite | exit code |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {server.get('answered', False)} | {server.get('dtype', '')} | {server.get('device', '')} | "
        f"{_fmt(server.get('start_seconds', math.nan))} | {_fmt(server.get('call_seconds', math.nan))} | "
        f"{server.get('scores_finite', '')} | {server.get('exit_code', '')} |",
    ]
    if report["errors"]:
        lines += ["", "## Errors", ""] + [f"- {name}: {error}" for name, error in report["errors"].items()]
    return "\n".join(lines) + "\n"


def environment(plan: Plan) -> dict[str, Any]:
    import transformers

    name = torch.cuda.get_device_name(0) if plan.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes and sizes on the CPU")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu-check")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no part after this many s")
    parser.add_argument(
        "--parts", default="precision,long_prompts,concurrency,server", help="comma-separated subset"
    )
    args = parser.parse_args(argv)
    plan = SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    if plan.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --cpu-smoke")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference means fp32
    if args.cpu_smoke:
        torch.set_num_threads(1)  # tiny matrices: more threads only add overhead
    started = time.monotonic()
    deadline = started + args.budget_s
    wanted = set(args.parts.split(","))
    report: dict[str, Any] = {
        "cpu_smoke": args.cpu_smoke,
        "environment": environment(plan),
        "precision": [],
        "long_prompts": {},
        "concurrency": {},
        "server": {},
        "errors": {},
        "seconds": {},
    }
    with tempfile.TemporaryDirectory(prefix="seqsal-gpu-check-") as tmp:
        parts: list[tuple[str, Callable[[], Any]]] = [
            ("precision", lambda: check_precision(plan)),
            ("long_prompts", lambda: check_long_prompts(plan, deadline)),
            ("concurrency", lambda: check_concurrency(plan, deadline)),
            ("server", lambda: check_server(plan, Path(tmp))),
        ]
        for name, run in parts:
            if name not in wanted:
                continue
            if time.monotonic() > deadline:
                report["errors"][name] = "skipped: time budget"
                continue
            part_started = time.monotonic()
            print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
            try:
                report[name] = run()
            except Exception as error:  # record and go on: one broken part must not hide the others
                report["errors"][name] = f"{type(error).__name__}: {error}"
            report["seconds"][name] = time.monotonic() - part_started
            free_memory(plan.device)
    report["total_seconds"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = markdown(report)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
