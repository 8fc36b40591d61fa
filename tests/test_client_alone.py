"""The contract and the client stand alone: a process that cannot import torch, transformers, vLLM,
numpy or any server code calls a running saliency server and gets the same answer as the tests'
own client (what another service gets from `pip install seqsal`; the packages themselves are
checked in tests/test_deploy.py)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from conftest import SaliencyServerFactory

from saliency_server.settings import SaliencySettings
from seqsal.client import AsyncSaliencyClient
from seqsal.v1 import common_pb2

REPO = Path(__file__).resolve().parent.parent
BLOCKED = (
    "torch",
    "transformers",
    "vllm",
    "numpy",
    "redis",
    "streamlit",
    "server_kit",
    "saliency_server",
    "inference_server",
    "seqsal_cli",
    "ui",
)
PROMPT, TARGET = "The capital of France is", " Paris."

# Runs in a fresh interpreter: a meta-path finder refuses the blocked modules before anything loads.
CALLER = """
import importlib.abc, json, sys

BLOCKED = set(sys.argv[2].split(","))


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the client must not need it")
        return None


sys.meta_path.insert(0, Refuse())

from seqsal.client import SaliencyClient
from seqsal.v1 import common_pb2

with SaliencyClient(sys.argv[1], token="", tls=False, timeout=60) as client:
    models = client.list_models()
    answer = client.saliency(prompt=sys.argv[3], target=sys.argv[4], granularity=common_pb2.WORDS)
print(json.dumps({
    "models": [m.id for m in models.models],
    "tokens": [t.text for t in answer.tokens],
    "segments": [[s.text, list(s.scores)] for s in answer.segments],
    "loaded": sorted({name.split(".")[0] for name in sys.modules}),
}))
"""


def make_settings(model: str) -> SaliencySettings:
    values: dict[str, Any] = {
        "models": [model],
        "device": "cpu",
        "dtype": "float32",
        "redis_url": None,
        "auth_tokens": [],
        "auth_token_file": None,
        "rate_limit_per_minute": 0,
    }
    return SaliencySettings(_env_file=None, **values)  # type: ignore[call-arg]


async def test_the_client_calls_a_server_without_torch_numpy_or_server_code(
    run_saliency_server: SaliencyServerFactory, tiny_llama_dir: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSAL_")}
    env["PYTHONPATH"] = str(REPO)
    async with run_saliency_server(make_settings(f"tiny={tiny_llama_dir}")) as srv:
        caller = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CALLER,
            srv.address,
            ",".join(BLOCKED),
            PROMPT,
            TARGET,
            env=env,
            cwd=str(REPO),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(caller.communicate(), timeout=120)
        assert caller.returncode == 0, err.decode()
        alone = json.loads(out)
        async with AsyncSaliencyClient(srv.address, token="", tls=False, timeout=60) as client:
            here = await client.saliency(prompt=PROMPT, target=TARGET, granularity=common_pb2.WORDS)
    assert alone["models"] == ["tiny"]
    assert alone["tokens"] == [t.text for t in here.tokens] and "".join(alone["tokens"]).endswith(
        PROMPT + TARGET
    )
    assert alone["segments"] == [[s.text, list(s.scores)] for s in here.segments]
    assert any(score != 0.0 for _, scores in alone["segments"] for score in scores)
    assert "seqsal" in alone["loaded"] and "grpc" in alone["loaded"]
    assert not set(alone["loaded"]) & set(BLOCKED), alone["loaded"]
