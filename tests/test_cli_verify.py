"""`seqsal verify`, the perturbation methods in `seqsal saliency`, `seqsal batch --verify` and
`seqsal report`, on a tiny model (in-process, and through real servers for the batch)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from inference_server.settings import InferenceSettings
from saliency_server.settings import SaliencySettings
from seqsal.v1 import common_pb2
from seqsal_cli.batch import BatchOptions, run_batch
from seqsal_cli.cli import app

runner = CliRunner()
PROMPT = "The fox is quick. Paris is the capital of France. Rome is old.\nThe capital of France is"
TARGET = " Paris."


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    from seqsal_cli import cli

    monkeypatch.setattr(cli.console, "width", 200)


def test_verify_prints_the_result_in_words(tiny_llama_dir: Path) -> None:
    args = ["verify", "--prompt", PROMPT, "--target", TARGET, "--model", f"tiny={tiny_llama_dir}"]
    result = runner.invoke(app, [*args, "--method", "occlusion", "--k", "1", "--k", "2", "--show-prompts"])
    assert result.exit_code == 0, result.output
    number = r"-?\d+\.\d"
    assert re.search(
        rf"removing the most salient sentence (lowers|raises) log p\(target\) by \d+\.\d nats; "
        rf"1 random sentence: {number} ± \d+\.\d",
        result.output,
    ), result.output
    assert re.search(r"removing the 2 most salient sentences (lowers|raises)", result.output)
    assert "scored by saliency server (transformers" in result.output
    as_json = runner.invoke(app, [*args, "--format", "json", "--draws", "3"])
    assert as_json.exit_code == 0, as_json.output
    response = json.loads(as_json.output)
    assert [s["k"] for s in response["steps"]] == [1, 2, 3]
    assert all(len(s["random_drops"]) == 3 for s in response["steps"])
    bad = runner.invoke(app, [*args, "--k", "0"])
    assert bad.exit_code == 2 and "INVALID_ARGUMENT (field: k)" in bad.output


def test_saliency_command_offers_the_perturbation_methods(tiny_llama_dir: Path) -> None:
    result = runner.invoke(
        app,
        [
            "saliency",
            "--prompt",
            PROMPT,
            "--target",
            TARGET,
            "--model",
            f"tiny={tiny_llama_dir}",
            "--method",
            "occlusion",
            "--method",
            "lime",
            "--samples",
            "12",
            "--granularity",
            "sentences",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    response = json.loads(result.output)
    lime = response["scores"][1]
    assert [s["method"] for s in response["scores"]] == ["OCCLUSION", "LIME"]
    assert lime["perturbations"] == 12 and "r2" in lime


@pytest.fixture(scope="module")
async def servers(
    run_inference_server, run_saliency_server, tiny_llama_dir: Path
) -> AsyncIterator[tuple[str, str]]:  # type: ignore[no-untyped-def]
    models = [f"tiny={tiny_llama_dir}"]
    async with (
        run_inference_server(
            InferenceSettings(models=models, backend="transformers", metrics_port=0)
        ) as inference,
        run_saliency_server(
            SaliencySettings(models=models, metrics_port=0, score_address=inference.address)
        ) as saliency,
    ):
        yield saliency.address, inference.address


@pytest.mark.asyncio(loop_scope="session")
async def test_batch_verify_and_the_report(servers: tuple[str, str], tmp_path: Path) -> None:
    saliency, inference = servers
    source = tmp_path / "in.jsonl"
    rows = [
        {"id": "a", "prompt": PROMPT, "target": TARGET},
        {
            "id": "b",
            "prompt": "Rome is old. Paris is big. The fox is quick.\nWhat is big?",
            "target": " Paris.",
        },
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    options = BatchOptions(
        methods=[common_pb2.GRAD_L2, common_pb2.OCCLUSION], granularity=common_pb2.SENTENCES, verify=True
    )
    written, failed, _ = await run_batch(
        source, out, options, saliency_address=saliency, inference_address=inference
    )
    assert (written, failed) == (2, 0)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for record in records:
        assert set(record["verify"]) == {"GRAD_L2", "OCCLUSION"}
        check = record["verify"]["OCCLUSION"]
        assert check["granularity"] == "SENTENCES"
        assert check["scored_by"].startswith("inference server")
        assert [s["k"] for s in check["steps"]] == [1, 2, 3]
    plot = tmp_path / "faithfulness.png"
    result = runner.invoke(app, ["report", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "GRAD_L2" in result.output and "OCCLUSION" in result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the table's top-k drop is the mean over the rows
    expected = sum(r["verify"]["OCCLUSION"]["steps"][0]["topk_drop"] for r in records) / 2
    line = next(x for x in result.output.splitlines() if "OCCLUSION" in x and re.search(r"│\s*1\s*│", x))
    assert f"{expected:.2f}" in line
    empty = tmp_path / "plain.jsonl"
    empty.write_text(json.dumps({"id": "x", "saliency": {}}) + "\n")
    assert runner.invoke(app, ["report", str(empty)]).exit_code == 1
