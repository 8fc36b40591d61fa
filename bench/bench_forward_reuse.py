"""Forward-pass reuse: a response's sentences, then its words, with and without kept forward passes.

Run from the repository root::

    .venv/bin/python bench/bench_forward_reuse.py                          # 512 and 2048 tokens
    .venv/bin/python bench/bench_forward_reuse.py --sizes 1024 --json bench/results/reuse.json

What a user does in the workbench: the UI precomputes every sentence of the response
(SaliencyAllSegments at SENTENCES), then the user switches to words (SaliencyAllSegments at
WORDS, new selections of the same prompt and target). Per prompt size, in one process and on
one engine configuration each (default model, GRAD_L2 + GRAD_DOT_INPUT, a 32-token target cut
into 4 "sentences" of 8 tokens and 16 "words" of 2 tokens):

- ``kept``: an engine with a forward cache (the server's default): the sentences' pass is kept
  and the words reuse it;
- ``none``: an engine without one (``SEQSAL_FORWARD_CACHE_MB=0``): every call runs its own forward.

The two configurations alternate (``none`` first, then ``kept``, then again for each repeat);
the figures are medians of wall-clock and of CPU (process) seconds, which other processes on a
shared machine disturb less, and the ratios ``kept ÷ none`` come from the same run. The words'
scores of both are compared (max relative error). This is a benchmark, not a test.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench_long_prompts import _ids, machine_info, relative_error  # noqa: E402

MIB = 1024 * 1024
TARGET_TOKENS = 32
#: wall-clock and CPU seconds (process time: less sensitive to other processes on a shared machine)
TIMES = ("sentences_s", "words_s", "sentences_cpu_s", "words_cpu_s")


def segment_masks(n_target: int, size: int) -> Any:
    """Contiguous selections of ``size`` tokens covering the target."""
    import numpy as np

    starts = range(0, n_target, size)
    masks = np.zeros((len(starts), n_target), dtype=bool)
    for row, start in enumerate(starts):
        masks[row, start : start + size] = True
    return masks


def one_round(model: Any, inputs: Any, keep: bool) -> dict[str, Any]:
    from saliency_server.engine import GradientEngine
    from saliency_server.forward_cache import ForwardCache
    from seqsal.v1 import common_pb2

    methods = (common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT)
    cache = ForwardCache(max_bytes=(4096 if keep else 0) * MIB)
    engine = GradientEngine(model, forward_cache=cache)
    n = len(inputs.target_ids)
    wall, cpu = time.perf_counter(), time.process_time()
    list(engine.saliency_batch(inputs, segment_masks(n, 8), methods))
    sentences, sentences_cpu = time.perf_counter() - wall, time.process_time() - cpu
    mode = engine.last_checkpointing
    held = cache.bytes_held()
    wall, cpu = time.perf_counter(), time.process_time()
    words = list(engine.saliency_batch(inputs, segment_masks(n, 2), methods))
    return {
        "sentences_s": sentences,
        "words_s": time.perf_counter() - wall,
        "sentences_cpu_s": sentences_cpu,
        "words_cpu_s": time.process_time() - cpu,
        "mode": mode,
        "held_mib": held / MIB,
        "words": words,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from saliency_server.engine import SaliencyInputs
    from server_kit.default_model import ensure_default_model
    from server_kit.model_registry import load_causal_lm, load_tokenizer
    from server_kit.settings import ModelSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else ensure_default_model(ModelSettings())
    model = load_causal_lm(path, torch.device("cpu"), torch.float32)
    tokenizer = load_tokenizer(path)
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        prompt, target = _ids(model, tokenizer, size, TARGET_TOKENS)
        inputs = SaliencyInputs(prompt_ids=prompt, target_ids=target)
        one_round(model, SaliencyInputs(prompt_ids=prompt[:64], target_ids=target), True)  # warm-up
        rounds: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        for _ in range(args.repeats):
            for keep in (False, True):
                rounds[keep].append(one_round(model, inputs, keep))
                print(f"{size} tokens, kept={keep}: {_brief(rounds[keep][-1])}", file=sys.stderr, flush=True)
        row: dict[str, Any] = {"tokens": size, "target_tokens": len(target)}
        for keep, name in ((False, "none"), (True, "kept")):
            done = rounds[keep]
            row[name] = {key: statistics.median(r[key] for r in done) for key in TIMES}
            row[name].update(mode=done[0]["mode"], held_mib=done[0]["held_mib"])
            row[name]["total_s"] = row[name]["sentences_s"] + row[name]["words_s"]
            row[name]["total_cpu_s"] = row[name]["sentences_cpu_s"] + row[name]["words_cpu_s"]
        for part in (*TIMES, "total_s", "total_cpu_s"):
            row[f"{part.removesuffix('_s')}_ratio"] = row["kept"][part] / row["none"][part]
        row["max_rel_error"] = max(
            relative_error(a.scores[m], b.scores[m])
            for a, b in zip(rounds[True][0]["words"], rounds[False][0]["words"], strict=True)
            for m in a.scores
        )
        rows.append(row)
    return {"machine": machine_info(), "model": str(path), "repeats": args.repeats, "rows": rows}


def _brief(result: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in result.items() if k != "words"})


def report(results: dict[str, Any]) -> None:
    print(f"machine: {json.dumps(results['machine'])}")
    print(
        f"{'tokens':>6} {'config':>6} {'mode':>14} {'held MiB':>9} {'sentences s':>11} {'words s':>8} "
        f"{'total s':>8}"
    )
    for row in results["rows"]:
        for name in ("none", "kept"):
            r = row[name]
            print(
                f"{row['tokens']:>6} {name:>6} {r['mode']:>14} {r['held_mib']:>9.0f} "
                f"{r['sentences_s']:>11.2f} {r['words_s']:>8.2f} {r['total_s']:>8.2f}"
            )
        print(
            f"{'':>6} kept ÷ none: sentences {row['sentences_ratio']:.2f}, words {row['words_ratio']:.2f}, "
            f"total {row['total_ratio']:.2f}; CPU time: sentences {row['sentences_cpu_ratio']:.2f}, "
            f"words {row['words_cpu_ratio']:.2f}, total {row['total_cpu_ratio']:.2f}; "
            f"max rel. error of the words' scores {row['max_rel_error']:.1e}"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--model", default="", help="model directory (default: the default model)")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
