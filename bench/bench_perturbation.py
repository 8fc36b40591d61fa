"""OCCLUSION's cost: N sentence segments scored in one batched call vs N sequential forward passes.

Run from the repository root::

    .venv/bin/python bench/bench_perturbation.py                    # 24 sentences, default model
    SEQSAL_DATA_DIR=.data .venv/bin/python bench/bench_perturbation.py   # the tests' converted copy
    .venv/bin/python bench/bench_perturbation.py --sentences 48 --vllm

One process, the default model (SmolLM2-135M-Instruct, float32), a prompt of N sentences and a
short target. Every prompt variant removes one sentence's token ids. Measured, each the median
of ``--repeats`` runs, in alternation:

- ``sequential`` (the reference): one plain no-grad forward pass per variant, one after the
  other - what Captum's and inseq's occlusion do in the caller's process;
- ``batched``: the same N+1 rows through ``server_kit.teacher_forcing.score_rows`` (padded,
  length-sorted batches of ``--batch-tokens``) - the saliency server's fallback and the
  inference server's transformers backend;
- ``gradient``: one GRAD_L2 + GRAD_DOT_INPUT saliency call for the whole target on the same
  prompt (one forward and one backward pass), for scale;
- ``vllm`` (with ``--vllm``): the rows through vLLM's engine as one batch (``VllmBackend.score_rows``,
  the inference server's default backend), after one warm-up call.

Printed: seconds and ratios against ``sequential``, and the largest difference of the effects
(nats) between each method and the reference. This is a benchmark, not a test.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench_long_prompts import machine_info  # noqa: E402

SENTENCES = [
    "The harbour was quiet before dawn.",
    "Fishing boats rocked gently against the pier.",
    "A gull cried once and then fell silent.",
    "The baker on the corner lit his ovens.",
    "Smoke rose straight up in the still air.",
    "Somewhere a radio played an old song.",
    "The secret word for today is lighthouse.",
    "Children would soon run down to the beach.",
    "Nets lay drying on the warm stones.",
    "An old man counted his coins twice.",
    "The tide had turned an hour ago.",
    "Clouds gathered slowly over the hills.",
]
TARGET = " The secret word is lighthouse."


def build_prompt(n: int) -> str:
    return " ".join(SENTENCES[i % len(SENTENCES)] for i in range(n)) + "\nWhat is the secret word?"


def median_time(run: Any, repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sentences", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--vllm", action="store_true", help="also score through vLLM (starts an engine)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from saliency_server.engine import GradientEngine, SaliencyInputs
    from saliency_server.perturbation import ablate, perturbation_segments, prompt_features
    from saliency_server.settings import SaliencySettings
    from seqsal import segmentation
    from seqsal.v1 import common_pb2
    from server_kit.default_model import ensure_default_model
    from server_kit.model_registry import load_causal_lm, load_tokenizer
    from server_kit.teacher_forcing import score_rows
    from server_kit.tokenization import tokenize

    machine = machine_info()  # the load average when the run starts
    settings = SaliencySettings(_env_file=None)  # type: ignore[call-arg]
    model_dir = ensure_default_model(settings)
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, torch.device("cpu"), torch.float32)
    prompt_tokens = tokenize(
        tokenizer, build_prompt(args.sentences), part=common_pb2.PROMPT, add_special_tokens=True
    )
    target_tokens = tokenize(tokenizer, TARGET, part=common_pb2.TARGET, add_special_tokens=False)
    tokens = prompt_tokens + target_tokens
    segments = segmentation.segment_tokens(tokens, common_pb2.SENTENCES, "")
    features = prompt_features(tokens, perturbation_segments(tokens, segments, common_pb2.SENTENCES))
    prompt_ids = [t.id for t in prompt_tokens]
    target_ids = [t.id for t in target_tokens]
    variants = [prompt_ids] + [ablate(prompt_ids, features, [f]) for f in range(len(features))]
    rows = [(v, target_ids) for v in variants]
    print(
        f"{len(prompt_ids)} prompt tokens, {len(target_ids)} target tokens, "
        f"{len(features)} sentence segments ({len(rows)} rows scored)"
    )

    def sequential() -> np.ndarray:
        out = []
        with torch.no_grad():
            for prompt, target in rows:
                ids = torch.tensor([[*prompt, *target]])
                logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1].float()
                lp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None])
                out.append(float(lp.double().sum()))
        return np.array(out)

    def batched() -> np.ndarray:
        scored = score_rows(model, rows, batch_tokens=args.batch_tokens)
        return np.array([float(lp.astype(np.float64).sum()) for lp in scored])

    engine = GradientEngine(model)
    inputs = SaliencyInputs(prompt_ids=prompt_ids, target_ids=target_ids)

    def gradient() -> None:
        engine.saliency(inputs, [True] * len(target_ids), [common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT])

    figures: dict[str, list[float]] = {"sequential": [], "batched": [], "gradient": []}
    results: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):  # alternate, so a change of load hits every method alike
        for name, run in (("sequential", sequential), ("batched", batched), ("gradient", gradient)):
            seconds, result = median_time(run, 1)
            figures[name].append(seconds)
            print(f"  {name}: {seconds:.1f} s", flush=True)  # kept in the log if the run is stopped
            if result is not None:
                results[name] = result

    if args.vllm:
        from inference_server.backends.vllm_backend import VllmBackend
        from inference_server.settings import InferenceSettings
        from server_kit.model_registry import ModelSpec

        # the inference server's settings (SEQSAL_VLLM_KV_CACHE_GB, SEQSAL_MAX_MODEL_LEN, ...)
        inference = InferenceSettings(_env_file=None)  # type: ignore[call-arg]
        backend = VllmBackend(ModelSpec(id="bench", path=model_dir), tokenizer, inference)

        async def vllm_runs() -> tuple[list[float], np.ndarray]:
            await backend.start()
            try:
                await backend.score_rows(rows)  # warm-up
                times, out = [], np.zeros(0)
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    scored = await backend.score_rows(rows)
                    times.append(time.perf_counter() - start)
                    print(f"  vllm: {times[-1]:.1f} s", flush=True)
                    out = np.array([float(np.sum(np.asarray(lp, dtype=np.float64))) for lp in scored])
                return times, out
            finally:
                await backend.close()

        figures["vllm"], results["vllm"] = asyncio.run(vllm_runs())

    reference = statistics.median(figures["sequential"])
    effects = {name: values[0] - values[1:] for name, values in results.items()}
    report: dict[str, Any] = {
        "machine": machine,
        "prompt_tokens": len(prompt_ids),
        "target_tokens": len(target_ids),
        "segments": len(features),
        "seconds": {name: statistics.median(values) for name, values in figures.items()},
    }
    print(f"{'method':<12}{'seconds':>10}{'x sequential':>14}{'max |effect diff|':>20}")
    for name, values in figures.items():
        seconds = statistics.median(values)
        diff = (
            f"{float(np.max(np.abs(effects[name] - effects['sequential']))):.2e}" if name in effects else "-"
        )
        print(f"{name:<12}{seconds:>10.3f}{seconds / reference:>14.2f}{diff:>20}")
        report.setdefault("ratio", {})[name] = seconds / reference
        if name in effects:
            report.setdefault("max_effect_diff", {})[name] = float(
                np.max(np.abs(effects[name] - effects["sequential"]))
            )
    report["machine"]["load_avg_end"] = os.getloadavg()
    if args.vllm:
        import vllm

        report["machine"]["vllm"] = vllm.__version__
    print(json.dumps(report["machine"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
