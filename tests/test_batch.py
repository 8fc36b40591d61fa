"""`seqsal batch`: a JSONL set explained through the two services, resumable."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inference_server.settings import InferenceSettings
from saliency_server.settings import SaliencySettings
from seqsal.v1 import common_pb2
from seqsal_cli.batch import BatchOptions, run_batch

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROWS = [
    {"id": "given", "prompt": "Taste-likes: Cheese\nAnalysis:", "target": " A savoury tart. Not for you."},
    {"id": "generated", "prompt": "The cat sat on the"},
    {"id": "bad", "prompt": "x", "target": "y", "foil": ""},
]


@pytest.fixture(scope="module")
async def servers(
    run_inference_server, run_saliency_server, tiny_llama_dir: Path
) -> AsyncIterator[tuple[str, str]]:  # type: ignore[no-untyped-def]
    models = [f"tiny={tiny_llama_dir}"]
    async with (
        run_inference_server(InferenceSettings(models=models, backend="transformers")) as inference,
        run_saliency_server(SaliencySettings(models=models)) as saliency,
    ):
        yield saliency.address, inference.address


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


async def test_batch_explains_every_row_and_resumes(servers: tuple[str, str], tmp_path: Path) -> None:
    saliency, inference = servers
    source = write_rows(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    options = BatchOptions(granularity=common_pb2.SENTENCES, max_new_tokens=6, concurrency=2)
    progress: list[tuple[int, int]] = []
    written, failed, skipped = await run_batch(
        source, out, options, saliency_address=saliency, inference_address=inference,
        on_progress=lambda d, t: progress.append((d, t)),
    )  # fmt: skip
    assert (written, failed, skipped) == (3, 1, 0)
    assert progress[-1] == (3, 3)
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    given = records["given"]
    assert given["generated"] is False and given["target"] == ROWS[0]["target"]
    target_segments = [s["text"] for s in given["saliency"]["segments"] if s["part"] == "TARGET"]
    assert target_segments == [" A savoury tart.", " Not for you."]
    generated = records["generated"]
    assert generated["generated"] is True and generated["target"]
    tokens = generated["saliency"]["tokens"]
    assert sum(t.get("part") == "TARGET" for t in tokens) > 0
    assert records["bad"]["error"] == {
        "code": "INVALID_ARGUMENT",
        "field": "foil",
        "message": records["bad"]["error"]["message"],
    }

    # a rerun skips what is done; an interrupted run's half line is dropped and its row redone
    assert await run_batch(source, out, options, saliency_address=saliency, inference_address=inference) == (
        0,
        0,
        3,
    )
    lines = out.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["id"] != "given"]
    out.write_text("".join(kept) + lines[[json.loads(x)["id"] for x in lines].index("given")][:40])
    assert await run_batch(source, out, options, saliency_address=saliency, inference_address=inference) == (
        1,
        0,
        2,
    )
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in final) == ["bad", "generated", "given"]


async def test_batch_cli(servers: tuple[str, str], tmp_path: Path) -> None:
    saliency, inference = servers
    source = write_rows(tmp_path / "in.jsonl", ROWS[:2])
    out = tmp_path / "out.jsonl"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "seqsal_cli", "batch", str(source), "--out", str(out), "--granularity", "words",
        "--saliency-server", saliency, "--inference-server", inference, "--max-new-tokens", "4",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    assert "wrote 2 rows" in stderr.decode()
    assert len(out.read_text().splitlines()) == 2


async def test_batch_rejects_bad_input_files(servers: tuple[str, str], tmp_path: Path) -> None:
    saliency, inference = servers
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"no_prompt": 1}\n')
    from seqsal.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=r"bad\.jsonl:2"):
        await run_batch(
            bad, tmp_path / "o.jsonl", BatchOptions(), saliency_address=saliency, inference_address=inference
        )
    dup = write_rows(tmp_path / "dup.jsonl", [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}])
    with pytest.raises(InvalidArgumentError, match="twice"):
        await run_batch(
            dup, tmp_path / "o.jsonl", BatchOptions(), saliency_address=saliency, inference_address=inference
        )
