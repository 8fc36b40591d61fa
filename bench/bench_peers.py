"""seqsal against the tools users would otherwise pick, on the same model, prompt and target ids.

Run from the repository root, with the peers installed (``pip install '.[bench]'``, or a
separate venv that sees this one's packages; see bench/README.md)::

    /work/venvs/long-peers/bin/python bench/bench_peers.py [--prompt-tokens 600] [--target-tokens 16]
                                                          [--repeats 1] [--json bench/results/peers.json]

Tools (each in its own subprocess, so its peak RSS is its own; time = median of ``--repeats``):

- ``reference``: one forward with ``inputs_embeds`` (full-vocab log-softmax at the target
  positions), one backward of the summed target log-probs; Grad x Input per prompt token;
- ``captum``: ``LLMGradientAttribution(LayerGradientXActivation(model, embeddings))``, the
  target given as ids (Captum attributes one target token at a time);
- ``inseq-saliency`` / ``inseq-input_x_gradient``: ``inseq.load_model(model, method)`` with
  forced decoding of the target (``generated_texts`` = prompt + target);
- ``seqsal``: one Saliency call (GRAD_L2 + GRAD_DOT_INPUT) over gRPC to a server started in
  the worker, with the target as ``target_token_ids``.

Agreement with the reference per prompt token: Pearson correlation and top-10 overlap (of
|score|), and the relative error where the tool computes the same quantity (seqsal's
GRAD_DOT_INPUT, Captum's sequence attribution). This is a benchmark, not a test.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TOOLS = ("reference", "seqsal", "captum", "inseq-input_x_gradient", "inseq-saliency")
MIB = 1024 * 1024


def _workload(tokenizer: Any, n_prompt: int, n_target: int) -> tuple[str, list[int], list[int]]:
    """Prompt text whose ids are exactly what the tokenizer gives back, and the target ids."""
    from bench.bench_saliency import TARGET_TEXT, few_shot_text

    text = few_shot_text(1, 8 * n_prompt + 400)
    encoded = tokenizer(text, return_offsets_mapping=True)
    end = encoded["offset_mapping"][n_prompt - 1][1]
    prompt = text[:end]
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(TARGET_TEXT, add_special_tokens=False)["input_ids"][:n_target]
    return prompt, prompt_ids, target_ids


def _reference(model: Any, prompt_ids: list[int], target_ids: list[int]) -> Any:
    import torch

    ids = torch.tensor([prompt_ids + target_ids])
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, use_cache=False).logits[0]
    n = len(prompt_ids)
    log_probs = torch.log_softmax(logits[n - 1 : -1].float(), dim=-1)
    value = log_probs.gather(-1, ids[0, n:].unsqueeze(-1)).sum()
    (grad,) = torch.autograd.grad(value, embeds)
    return (grad[0] * embeds[0]).sum(-1)[:n].detach().numpy()


def _seqsal(model_dir: Path, workloads: list[tuple[str, list[int], list[int]]]) -> list[tuple[Any, float]]:
    """Scores and RPC seconds for each workload, from one server (the first call warms it up)."""
    import asyncio

    import numpy as np

    from saliency_server.server import build_server, build_serving
    from saliency_server.settings import SaliencySettings
    from seqsal.client import AsyncSaliencyClient
    from seqsal.v1 import common_pb2

    settings = SaliencySettings(  # type: ignore[call-arg]
        _env_file=None, models=[str(model_dir)], device="cpu", dtype="float32", redis_url=None, metrics_port=0
    )

    async def calls() -> list[tuple[Any, float]]:
        serving = build_serving(settings)
        server = build_server(serving, settings)
        port = server.bind("127.0.0.1", 0)
        await server.start()
        out = []
        try:
            async with AsyncSaliencyClient(f"127.0.0.1:{port}", timeout=3600) as client:
                for index, (prompt, _, target_ids) in enumerate(workloads):
                    started = time.perf_counter()
                    # repeats select all target tokens but the (index-1)-th, so the cache never answers
                    mask = [i != index - 2 for i in range(len(target_ids))]
                    response = await client.saliency(
                        prompt=prompt, target_token_ids=target_ids, target_mask=mask
                    )
                    seconds = time.perf_counter() - started
                    assert not response.cache_hit, "the cache answered a timed call"
                    dot = next(s for s in response.scores if s.method == common_pb2.GRAD_DOT_INPUT)
                    n = sum(1 for t in response.tokens if t.part == common_pb2.PROMPT)
                    out.append((np.asarray(dot.scores[:n]), seconds))
        finally:
            await server.stop(0.5)
            serving.close()
        return out

    return asyncio.run(calls())


def _run(
    tool: str, model: Any, tokenizer: Any, prompt: str, prompt_ids: list[int], target_ids: list[int]
) -> Any:
    import numpy as np
    import torch

    if tool == "reference":
        return _reference(model, prompt_ids, target_ids)
    if tool == "captum":
        from captum.attr import LayerGradientXActivation, LLMGradientAttribution, TextTokenInput

        attribution = LLMGradientAttribution(
            LayerGradientXActivation(model, model.get_input_embeddings()), tokenizer
        )
        result = attribution.attribute(TextTokenInput(prompt, tokenizer), target=torch.tensor(target_ids))
        return result.seq_attr.detach().float().numpy()
    import inseq

    method = tool.split("-", 1)[1]
    attribution_model = inseq.load_model(model, method, tokenizer=tokenizer)
    target_text = tokenizer.decode(prompt_ids + target_ids, skip_special_tokens=False)
    out = attribution_model.attribute(
        input_texts=prompt, generated_texts=target_text, show_progress=False, attributed_fn="logit"
    )
    matrix = out.sequence_attributions[0].aggregate().target_attributions.float().numpy()
    return np.nansum(matrix, axis=1)[: len(prompt_ids)]


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model_dir = Path(spec["model"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    warm = _workload(tokenizer, 32, 4)
    work = _workload(tokenizer, spec["prompt_tokens"], spec["target_tokens"])
    tool = spec["tool"]
    if tool == "seqsal":
        results = _seqsal(model_dir, [warm] + [work] * spec["repeats"])[1:]
        times = [seconds for _, seconds in results]
        scores = results[0][0]  # every target token selected, like the reference
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa"
        )
        model.eval().requires_grad_(False)
        _run(tool, model, tokenizer, *warm)
        times = []
        for _ in range(spec["repeats"]):
            started = time.perf_counter()
            scores = _run(tool, model, tokenizer, *work)
            times.append(time.perf_counter() - started)
    np.save(spec["scores_path"], np.asarray(scores, dtype=np.float64))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**spec, "seconds": statistics.median(times), "all_seconds": times, "peak_rss_mib": peak / MIB}


def agreement(scores: Any, reference: Any) -> dict[str, float]:
    import numpy as np

    n = min(len(scores), len(reference))
    a, b = np.asarray(scores[:n], dtype=np.float64), np.asarray(reference[:n], dtype=np.float64)
    top = 10
    top_a = set(np.argsort(-np.abs(a))[:top])
    top_b = set(np.argsort(-np.abs(b))[:top])
    return {
        "pearson": float(np.corrcoef(a, b)[0, 1]),
        "top10_overlap": len(top_a & top_b) / top,
        "relative_error": float(np.abs(a - b).max() / (np.abs(b).max() or 1.0)),
        "length": n,
        "reference_length": len(reference),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tools", type=lambda t: t.split(","), default=list(TOOLS))
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--target-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument(
        "--model", type=Path, default=REPO_ROOT / ".data" / "models" / "SmolLM2-135M-Instruct"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import numpy as np

    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"seqsal-peers-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    for tool in args.tools:
        spec = {
            "tool": tool,
            "model": str(args.model),
            "prompt_tokens": args.prompt_tokens,
            "target_tokens": args.target_tokens,
            "repeats": args.repeats,
            "threads": args.threads,
            "scores_path": str(scratch / f"{tool}.npy"),
        }
        print(f"{tool} ...", file=sys.stderr, flush=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
            if done.returncode == 0:
                row = json.loads(done.stdout.strip().splitlines()[-1])
            else:
                tail = (done.stderr or done.stdout).strip().splitlines()[-4:]
                row = {**spec, "error": " | ".join(tail)}
        except subprocess.TimeoutExpired:
            row = {**spec, "error": f"timed out after {args.timeout:.0f} s"}
        print(
            f"  -> {json.dumps({k: row.get(k) for k in ('seconds', 'peak_rss_mib', 'error')})}",
            file=sys.stderr,
        )
        rows.append(row)
    reference = next((r for r in rows if r["tool"] == "reference" and "error" not in r), None)
    for row in rows:
        if reference is not None and "error" not in row:
            row["time_vs_reference"] = row["seconds"] / reference["seconds"]
            row["agreement"] = agreement(np.load(row["scores_path"]), np.load(reference["scores_path"]))
        print(json.dumps({k: v for k, v in row.items() if k not in ("scores_path", "model")}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"load_avg": os.getloadavg(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
