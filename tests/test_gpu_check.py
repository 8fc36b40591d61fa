"""The GPU check (bench/gpu_check.py) runs end to end: its --cpu-smoke flag, tiny shapes on the CPU.

The real run needs a lent GPU (see bench/README.md); this proves that every part of the script
works and writes its JSON and Markdown, so the loan is not spent on fixing it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_cpu_smoke_run_writes_every_part(tmp_path: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cpu_smoke"] and report["errors"] == {}

    precision = report["precision"]
    assert {(r["shape"], r["dtype"], r["method"]) for r in precision} == {
        (shape, dtype, method)
        for shape in ("smollm2-135m", "llama3-8b")
        for dtype in ("bfloat16", "float16")
        for method in ("GRAD_L2", "GRAD_DOT_INPUT", "INTEGRATED_GRADIENTS")
    }
    for row in precision:
        assert row["finite"] and 0 <= row["relative_error"] < 0.1, row  # half precision is close
        assert 0 <= row["top10_overlap"] <= 1

    long_rows = report["long_prompts"]["rows"]
    assert [r["prompt_tokens"] for r in long_rows] == [32, 64, 128, 256]
    for row in long_rows:
        for part in ("forward", "saliency", "all_segments"):
            assert row[part]["seconds"] > 0
        assert row["saliency_over_forward"] > 0 and math.isfinite(row["all_segments_over_forward"])

    concurrency = report["concurrency"]["rows"]
    assert [r["concurrent"] for r in concurrency] == [1, 4, 16]
    assert all(r["requests_per_s"] > 0 and r["tokens_per_request"] > 32 for r in concurrency)
    assert concurrency[0]["throughput_over_single"] == 1.0

    server = report["server"]
    assert server["answered"] and server["scores_finite"] and server["exit_code"] == 0
    assert (server["dtype"], server["device"]) == ("float32", "cpu")

    table = (tmp_path / "gpu_check.md").read_text()
    for heading in (
        "## a. Precision",
        "## b. Long prompts",
        "## c. Concurrent",
        "## d. gRPC saliency server",
    ):
        assert heading in table
