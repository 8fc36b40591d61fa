"""``seqsal report``: how faithful each method is over an export made with ``seqsal batch --verify``.

For every method and k: over the rows, the mean drop in log p(target) when the method's top-k
segments are removed, the mean drop for k random segments, their difference, and how often the
top-k removal beat the random mean. A table, and a plot (matplotlib) of both drops against k.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Cell:
    """One (method, k) of the report."""

    method: str
    k: int
    rows: int
    topk_drop: float
    random_drop: float
    wins: float  # share of rows whose top-k drop beat the random mean

    @property
    def gain(self) -> float:
        return self.topk_drop - self.random_drop


def read_export(path: Path) -> list[Cell]:
    """The report's cells from a ``seqsal batch --verify`` output (rows without ``verify`` are skipped)."""
    drops: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            for method, result in (row.get("verify") or {}).items():
                if "steps" not in result:  # an error for this method
                    continue
                for step in result["steps"]:
                    drops[(method, int(step["k"]))].append(
                        (float(step.get("topk_drop", 0.0)), float(step.get("random_drop_mean", 0.0)))
                    )
    cells = []
    for (method, k), values in sorted(drops.items()):
        top, rand = np.array(values).T
        cells.append(
            Cell(method, k, len(values), float(top.mean()), float(rand.mean()), float((top > rand).mean()))
        )
    return cells


def plot(cells: list[Cell], out: Path) -> None:
    """Mean top-k drop (solid) and random drop (dashed) against k, one colour per method, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    methods = sorted({c.method for c in cells})
    for index, method in enumerate(methods):
        mine = sorted((c for c in cells if c.method == method), key=lambda c: c.k)
        colour = f"C{index}"
        ks = [c.k for c in mine]
        axes.plot(ks, [c.topk_drop for c in mine], "o-", color=colour, label=f"{method}: top-k removed")
        axes.plot(ks, [c.random_drop for c in mine], "x--", color=colour, label=f"{method}: k random")
    axes.axhline(0.0, color="grey", linewidth=0.5)
    axes.set_xlabel("k (segments removed)")
    axes.set_ylabel("mean drop in log p(target), nats")
    axes.set_title("Faithfulness: removing the most salient segments")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
