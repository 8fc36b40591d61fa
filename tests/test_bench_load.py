"""Smoke test of the load generator (bench/bench_load.py): a few calls of every kind on a tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from bench import bench_load
from inference_server.settings import InferenceSettings
from saliency_server.settings import SaliencySettings

if TYPE_CHECKING:
    from conftest import SaliencyServerFactory

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_load_generator_runs_every_rpc_and_stops_by_itself(
    run_saliency_server: SaliencyServerFactory, run_inference_server: Any, tiny_llama_dir: Path
) -> None:
    values: dict[str, Any] = {"models": [f"tiny={tiny_llama_dir}"], "device": "cpu"}
    saliency_settings = SaliencySettings(_env_file=None, redis_url=None, **values)  # type: ignore[call-arg]
    inference_settings = InferenceSettings(_env_file=None, backend="transformers", **values)  # type: ignore[call-arg]
    args = bench_load.parse_args(
        ["--quick", "--clients", "1,3", "--requests", "6", "--saliency", "x", "--inference", "y"]
    )
    async with (
        run_saliency_server(saliency_settings) as saliency,
        run_inference_server(inference_settings) as inference,
    ):
        result = await bench_load.drive(args, saliency.address, inference.address)
    levels = result["levels"]
    assert [level["clients"] for level in levels] == [1, 3]
    for level in levels:
        assert level["calls"] == level["clients"] * 6 and level["cut"] == 0  # all sent, none hung
        assert level["ok"] + sum(level["errors"].values()) == level["calls"]
        assert set(level["errors"]) <= {"RESOURCE_EXHAUSTED"}, level["errors"]
        assert level["p50_s"] is not None and level["p50_s"] <= level["p99_s"]
        assert level["probe_ratio"] is not None and level["recovered_s"] is not None
    rpcs = {rpc for level in levels for rpc in level["by_rpc"]}
    assert rpcs == {name for name, _ in bench_load.MIX}, rpcs  # the seeded mix draws every kind
    assert "| 3 | 18 |" in result["markdown"]
