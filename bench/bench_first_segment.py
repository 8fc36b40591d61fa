"""How often the prompt's first segment is the darkest: the attention sink with and without the scale rules.

Run from the repository root::

    .venv/bin/python bench/bench_first_segment.py [--method GRAD_L2] [--json out.json] [--model PATH]
                                                  [--data-dir DIR]

The first position of a causal LM soaks up gradient (an attention sink), so with plain sums the
prompt's first sentence or word looks most salient whatever is explained (issue 15). For every
bundled example (``ui/examples.jsonl``: its prompt, reference target and granularity, no chat
template, the workbench's defaults) and every view of it (the whole target, and each target
segment alone, from one SaliencyAllSegments call), this ranks the prompt's units by score as the
heatmap does (:func:`seqsal.render.units`), once with the default rules (the sink and special
tokens left out of segment sums and of the range) and once with ``include_sink`` (the plain sums),
and counts the views whose top-ranked unit is the prompt's first segment (for the default rules:
what is left of it without the sink), and those where it is in the top three.

The workload is the product's own examples on the default model, in process (the saliency
service's ``build_serving``, the in-process cache); no timing is reported, so the load of the
machine does not matter. A benchmark, not a test: CI never runs it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import datetime
import json
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from saliency_server.local import LocalSaliencyClient
from saliency_server.settings import SaliencySettings
from seqsal import colors, render
from seqsal.client import WholeMessages
from seqsal.scale import ScaleRules
from seqsal.v1 import common_pb2, saliency_pb2
from server_kit.default_model import default_model_dir
from server_kit.settings import ModelSettings
from ui.examples import load_examples

REPO_ROOT = Path(__file__).resolve().parent.parent
console = Console(width=None if sys.stdout.isatty() else 120, log_path=False)


@dataclass
class Counts:
    """Views whose top prompt unit is the first segment, and those with it in the top three."""

    views: int = 0
    first: int = 0
    top3: int = 0


def first_segment_rank(response: saliency_pb2.SaliencyResponse, rules: ScaleRules) -> int | None:
    """The 1-based rank (by darkness, as the heatmap draws) of the prompt's first segment among the
    prompt's counted units: the whole segment, or what is left of it once the sink is split off;
    None when nothing is left of it (a one-token first segment: the sink alone, out of the range)."""
    first_end = min(s.token_end for s in response.segments if s.part == common_pb2.PROMPT)
    prompt = [u for u in render.units(response, 0, True, rules) if u.part == common_pb2.PROMPT]
    counted = [u for u in prompt if not u.excluded]
    first = counted[0]
    if first.token_start >= first_end:
        return None
    # the darkest unit is the largest score, or the largest |score| for a signed method
    darkness = abs if colors.is_signed(response.scores[0].method) else float
    return 1 + sum(1 for u in counted if darkness(u.score) > darkness(first.score))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="GRAD_L2", choices=["GRAD_L2", "GRAD_DOT_INPUT"])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the default model)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".data", help="seqsal data dir")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    method = common_pb2.Method.Value(args.method)
    model_dir = args.model or default_model_dir(ModelSettings(data_dir=args.data_dir))
    rules = {"default rules": ScaleRules(), "plain sums (include_sink)": ScaleRules(include_sink=True)}
    counts = {name: Counts() for name in rules}
    per_example: list[dict[str, object]] = []
    models = {"models": [str(args.model)]} if args.model else {}
    settings = SaliencySettings(  # type: ignore[arg-type]
        data_dir=args.data_dir, redis_url=None, log_level="WARNING", **models
    )
    examples = [e for e in load_examples()[0] if e.target]  # the workbench's own loader
    with LocalSaliencyClient(settings) as client:
        for example in examples:
            granularity = common_pb2.Granularity.Value(example.granularity or "SENTENCES")
            whole = client.saliency(
                prompt=example.prompt, target=example.target, methods=[method], granularity=granularity
            )
            parts = client.saliency_all_segments(
                prompt=example.prompt, target=example.target, methods=[method], granularity=granularity
            )
            restore = WholeMessages()  # the stream sends tokens and segments once
            views = [whole, *(restore(m).saliency for m in parts)]
            row: dict[str, object] = {"example": example.id, "granularity": example.granularity}
            for name, rule in rules.items():
                ranks = [first_segment_rank(v, rule) for v in views]
                counts[name].views += len(ranks)
                counts[name].first += sum(r == 1 for r in ranks)
                counts[name].top3 += sum(r is not None and r <= 3 for r in ranks)
                row[name] = {"views": len(ranks), "first": sum(r == 1 for r in ranks)}
            per_example.append(row)
            console.log(f"{example.id}: {len(views)} views")

    table = Table(title=f"The prompt's first segment as the top unit ({args.method}, {model_dir.name})")
    for column in ("rules", "views", "ranks first", "in the top 3"):
        table.add_column(column, justify="left" if column == "rules" else "right")
    for name, c in counts.items():
        table.add_row(
            name, str(c.views), f"{c.first} ({c.first / c.views:.0%})", f"{c.top3} ({c.top3 / c.views:.0%})"
        )
    console.print(table)
    for row in per_example:
        console.print(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "machine": platform.platform(),
                    "torch": torch.__version__,
                    "method": args.method,
                    "model": str(model_dir),
                    "counts": {name: asdict(c) for name, c in counts.items()},
                    "examples": per_example,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
