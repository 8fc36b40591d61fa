"""Long prompts: peak RSS and time of one saliency computation against prompt length.

Run from the repository root::

    .venv/bin/python bench/bench_long_prompts.py                       # 512..8192 on the default model
    .venv/bin/python bench/bench_long_prompts.py --sizes 512,1024 --json bench/results/long.json
    .venv/bin/python bench/bench_long_prompts.py --dtypes float32,bfloat16   # bf16 error and speed
    .venv/bin/python bench/bench_long_prompts.py --tiny-sizes 4096,16384     # the tiny long-context model

Every measurement runs in its own subprocess (``--worker``), so its peak RSS
(``ru_maxrss``) is its own: the process loads the model, warms up at 64 tokens, then runs
one computation on ``N`` prompt tokens + a 16-token target:

- ``forward``: one no-grad forward pass asking for the target positions' logits only (as
  the engine does), the reference;
- ``off``: one saliency computation (GRAD_L2 + GRAD_DOT_INPUT, every target token
  selected; :meth:`GradientEngine.saliency`, what a Saliency call runs in the server) with
  checkpointing off (the plain pass);
- ``keep_attention``: the same, checkpointed, keeping the attention outputs (what ``auto``
  picks for a Saliency call from ``SEQSAL_CHECKPOINT_MIN_TOKENS`` on);
- ``full``: the same, every layer recomputed in full.

For each size they run back to back and the ratios (time and peak RSS against
``forward`` and ``off``) come from the same run. The checkpointed scores are compared
with the plain ones, and with ``--dtypes float32,bfloat16`` bf16's with fp32's on the
same ids (relative error per method). The estimate of
:func:`saliency_server.memory.estimate_peak_bytes` is reported beside the measured peak
increase. Results go to ``--json`` and a plot (PNG, matplotlib from the ``bench`` extra)
next to it. This is a benchmark, not a test: CI never runs it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import datetime
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MIB = 1024 * 1024
KINDS = ("forward", "off", "keep_attention", "full")
TINY_CONTEXT = 32768


# --- worker (one measurement per process) --------------------------------------------------------


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tiny_long_model() -> Any:
    """A 2-layer tiny Llama (tests/tiny_models.py) with a 32k context, random weights."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from tiny_models import build_config, build_tokenizer

    config = build_config("llama", build_tokenizer("llama"))
    config.max_position_embeddings = TINY_CONTEXT
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    return model


def _ids(model: Any, tokenizer: Any, n_prompt: int, n_target: int) -> tuple[list[int], list[int]]:
    """The restaurant few-shot prompt (bench_saliency's workload) cut to ``n_prompt`` ids."""
    from bench.bench_saliency import TARGET_TEXT, few_shot_text

    if tokenizer is None:  # the tiny model: its tokenizer is too small for natural text at 16k
        import torch

        generator = torch.Generator().manual_seed(n_prompt)
        ids = torch.randint(3, model.config.vocab_size, (n_prompt + n_target,), generator=generator)
        return ids[:n_prompt].tolist(), ids[n_prompt:].tolist()
    prompt = tokenizer(few_shot_text(1, 8 * n_prompt + 400))["input_ids"][:n_prompt]
    target = tokenizer(TARGET_TEXT, add_special_tokens=False)["input_ids"][:n_target]
    return prompt, target


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from saliency_server.checkpointing import CheckpointPolicy
    from saliency_server.engine import GradientEngine, SaliencyInputs
    from saliency_server.memory import estimate_peak_bytes
    from seqsal.v1 import common_pb2
    from server_kit.model_registry import load_causal_lm, load_tokenizer

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    if spec["model"] == "tiny-long":
        model, tokenizer = _tiny_long_model().to(dtype), None
    else:
        model = load_causal_lm(Path(spec["model"]), torch.device("cpu"), dtype)
        tokenizer = load_tokenizer(Path(spec["model"]))
    kind = spec["kind"]
    engine = GradientEngine(
        model, checkpoint_policy=CheckpointPolicy(mode="off" if kind == "forward" else kind)
    )
    methods = [common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT]

    def run(n_prompt: int) -> tuple[Any, SaliencyInputs]:
        prompt, target = _ids(model, tokenizer, n_prompt, spec["target_tokens"])
        inputs = SaliencyInputs(prompt_ids=prompt, target_ids=target)
        if kind == "forward":
            with torch.no_grad():
                embeds = engine.embed(prompt + target).unsqueeze(0)
                positions = torch.arange(len(prompt) - 1, len(prompt) + len(target) - 1)
                model(inputs_embeds=embeds, use_cache=False, logits_to_keep=positions)
            return None, inputs
        return engine.saliency(inputs, [True] * len(target), methods), inputs

    run(64)  # warm-up
    baseline = _current_rss_bytes()
    baseline_peak = _peak_rss_bytes()
    started = time.perf_counter()
    result, inputs = run(spec["tokens"])
    seconds = time.perf_counter() - started
    peak = _peak_rss_bytes()
    out: dict[str, Any] = {
        **spec,
        "seconds": seconds,
        "peak_rss_mib": peak / MIB,
        "baseline_rss_mib": baseline / MIB,
        "increase_mib": (peak - baseline) / MIB,
        "warmup_peak_mib": baseline_peak / MIB,
    }
    if result is not None:
        out["checkpointing"] = engine.last_checkpointing
        out["estimate_mib"] = (
            estimate_peak_bytes(
                model.config,
                prompt_tokens=len(inputs.prompt_ids),
                target_tokens=len(inputs.target_ids),
                n_selections=1,
                dtype=dtype,
                checkpointing=kind != "off",
            )
            / MIB
        )
        np.savez(spec["scores_path"], **{str(m): v for m, v in result.scores.items()})
    return out


# --- driver ---------------------------------------------------------------------------------------


def measure(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh subprocess and return its JSON line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {**spec, "error": f"exit {done.returncode}: {' | '.join(tail)}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def relative_error(actual: Any, reference: Any) -> float:
    import numpy as np

    scale = float(np.abs(reference).max()) or 1.0
    return float(np.abs(actual.astype(np.float64) - reference.astype(np.float64)).max() / scale)


def compare_scores(path_a: str, path_b: str) -> dict[str, float]:
    """Max |a - b| / max |b| per method (b the reference)."""
    import numpy as np

    from seqsal.v1 import common_pb2

    a, b = np.load(path_a), np.load(path_b)
    return {common_pb2.Method.Name(int(k)): relative_error(a[k], b[k]) for k in b.files}


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    from server_kit.cpu import bf16_support

    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16": bf16_support(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from server_kit.default_model import ensure_default_model
    from server_kit.settings import ModelSettings

    model = args.model or str(ensure_default_model(ModelSettings(data_dir=args.data_dir)))
    scratch = Path(tempfile.mkdtemp(prefix="seqsal-long-"))
    machine = machine_info()
    rows: list[dict[str, Any]] = []
    plan = [(model, size) for size in args.sizes if size > 0] + [
        ("tiny-long", size) for size in args.tiny_sizes
    ]
    for model_name, size in plan:
        for dtype in args.dtypes:
            for kind in args.kinds:
                spec = {
                    "model": model_name,
                    "tokens": size,
                    "target_tokens": args.target_tokens,
                    "kind": kind,
                    "dtype": dtype,
                    "threads": args.threads,
                    "scores_path": str(scratch / f"{Path(model_name).name}-{size}-{dtype}-{kind}.npz"),
                }
                print(f"{Path(model_name).name} {size} {dtype} {kind} ...", file=sys.stderr, flush=True)
                row = measure(spec, args.timeout)
                print(
                    f"  -> {json.dumps({k: row.get(k) for k in ('seconds', 'peak_rss_mib', 'error')})}",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append(row)
                if args.json:  # partial results survive an interrupted run
                    save(args.json, {"machine": machine, "model": model, "rows": derive(rows)})
    return {"machine": machine, "model": model, "rows": derive(rows)}


def save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


def derive(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratios and score agreement within each (model, size, dtype), and bf16 against fp32."""
    index = {(r["model"], r["tokens"], r["dtype"], r["kind"]): r for r in rows if "error" not in r}
    for (model_name, size, dtype, kind), row in index.items():
        forward = index.get((model_name, size, dtype, "forward"))
        plain = index.get((model_name, size, dtype, "off"))
        if forward and kind != "forward":
            row["time_vs_forward"] = row["seconds"] / forward["seconds"]
            row["rss_vs_forward"] = row["peak_rss_mib"] / forward["peak_rss_mib"]
        if plain and kind not in ("forward", "off"):
            row["time_vs_plain"] = row["seconds"] / plain["seconds"]
            row["rss_vs_plain"] = row["peak_rss_mib"] / plain["peak_rss_mib"]
            row["increase_vs_plain"] = row["increase_mib"] / plain["increase_mib"]
            row["error_vs_plain"] = compare_scores(row["scores_path"], plain["scores_path"])
        fp32 = index.get((model_name, size, "float32", kind))
        if dtype != "float32" and fp32 and kind != "forward":
            row["time_vs_float32"] = row["seconds"] / fp32["seconds"]
            row["error_vs_float32"] = compare_scores(row["scores_path"], fp32["scores_path"])
    return rows


def report(results: dict[str, Any]) -> None:
    print(f"machine: {json.dumps(results['machine'])}")
    header = (
        f"{'model':>22} {'tokens':>6} {'dtype':>8} {'kind':>12} {'time s':>8} {'peak RSS':>9} "
        f"{'increase':>9} {'estimate':>9} {'t/fwd':>6} {'t/plain':>7} {'rss/plain':>9} {'max rel err':>11}"
    )
    print(header)
    for r in results["rows"]:
        name = Path(r["model"]).name
        if "error" in r:
            print(f"{name:>22} {r['tokens']:>6} {r['dtype']:>8} {r['kind']:>12}  ERROR {r['error']}")
            continue
        errors = r.get("error_vs_plain") or r.get("error_vs_float32") or {}
        err = max(errors.values()) if errors else None

        def fmt(key: str, spec: str = ".2f", row: dict[str, Any] = r) -> str:
            value = row.get(key)
            return "" if value is None else format(value, spec)

        print(
            f"{name:>22} {r['tokens']:>6} {r['dtype']:>8} {r['kind']:>12} {r['seconds']:>8.2f} "
            f"{r['peak_rss_mib']:>8.0f}M {r['increase_mib']:>8.0f}M {fmt('estimate_mib', '.0f'):>8}M "
            f"{fmt('time_vs_forward'):>6} {fmt('time_vs_plain'):>7} {fmt('rss_vs_plain'):>9} "
            f"{'' if err is None else format(err, '.1e'):>11}"
        )


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[tuple[str, str, str], list[tuple[int, float, float]]] = {}
    for r in results["rows"]:
        if "error" not in r:
            key = (Path(r["model"]).name, r["dtype"], r["kind"])
            series.setdefault(key, []).append((r["tokens"], r["peak_rss_mib"] / 1024, r["seconds"]))
    for (name, dtype, kind), points in sorted(series.items()):
        points.sort()
        label = f"{name} {dtype} {kind}"
        xs = [p[0] for p in points]
        ax_rss.plot(xs, [p[1] for p in points], marker="o", label=label)
        ax_time.plot(xs, [p[2] for p in points], marker="o", label=label)
    for ax, title in ((ax_rss, "peak RSS (GiB)"), (ax_time, "time (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_time.set_yscale("log")
    ax_rss.legend(fontsize=7)
    fig.suptitle(f"seqsal long prompts ({results['machine']['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def joined(paths: Sequence[Path]) -> dict[str, Any]:
    """The rows of several runs in one result (the first run's machine, every run's date)."""
    runs = [json.loads(path.read_text()) for path in paths]
    machine = {**runs[0]["machine"], "runs": [r["machine"] for r in runs]}
    rows = derive([row for r in runs for row in r["rows"]])  # ratios across the runs too
    return {"machine": machine, "model": runs[0]["model"], "rows": rows}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=ints, default=[512, 1024, 2048, 4096, 8192], help="0 = none")
    parser.add_argument("--tiny-sizes", type=ints, default=[], help="sizes for the tiny 32k-context model")
    parser.add_argument("--kinds", type=lambda t: t.split(","), default=list(KINDS))
    parser.add_argument("--dtypes", type=lambda t: t.split(","), default=["float32"])
    parser.add_argument("--target-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--model", help="a local HF model directory (default: the default model)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".data")
    parser.add_argument("--json", type=Path, help="write the results here (and the plot beside it)")
    parser.add_argument(
        "--plot-from",
        type=lambda t: [Path(x) for x in t.split(",")],
        help="measure nothing: join the rows of these result files into --json and plot them",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    results = joined(args.plot_from) if args.plot_from else run(args)
    report(results)
    if args.json:
        save(args.json, results)
        try:
            plot(results, args.json.with_suffix(".png"))
            print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
        except ImportError:
            print(f"wrote {args.json} (no plot: pip install '.[bench]' for matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
