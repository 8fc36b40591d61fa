"""Peak-memory estimate, memory budget, refusal before compute, memory-weighted admission, max tokens."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers

from saliency_server import memory
from saliency_server.memory import estimate_peak_bytes, memory_budget_bytes, model_dims
from saliency_server.model_host import MAX_TOKENS_CAP, _max_tokens
from saliency_server.server import build_serving
from saliency_server.settings import SaliencySettings
from seqsal.errors import ResourceExhaustedError
from seqsal.v1 import common_pb2, saliency_pb2

GIB = 1024**3
MIB = 1024**2

# SmolLM2-135M's shape, without loading it
SMOL = transformers.LlamaConfig(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
)


def estimate(tokens: int, *, checkpointing: bool, n_selections: int = 1, rows: int = 1) -> int:
    return estimate_peak_bytes(
        SMOL,
        prompt_tokens=tokens - 16,
        target_tokens=16,
        n_selections=n_selections,
        dtype=torch.float32,
        checkpointing=checkpointing,
        rows=rows,
    )


def test_model_dims_from_llama_and_gpt2_configs() -> None:
    dims = model_dims(SMOL)
    assert (dims.layers, dims.hidden, dims.heads, dims.kv_heads, dims.head_dim) == (30, 576, 9, 3, 64)
    assert (dims.intermediate, dims.vocab) == (1536, 49152)
    gpt2 = model_dims(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100))
    assert (gpt2.layers, gpt2.hidden, gpt2.heads, gpt2.kv_heads, gpt2.intermediate) == (2, 64, 2, 2, 256)


def test_estimate_grows_with_the_work_and_checkpointing_cuts_it() -> None:
    sizes = [512, 1024, 2048, 4096, 8192]
    plain = [estimate(n, checkpointing=False) for n in sizes]
    lean = [estimate(n, checkpointing=True) for n in sizes]
    assert plain == sorted(plain) and lean == sorted(lean)
    assert all(c < p for c, p in zip(lean, plain, strict=True))
    # the figures: today 11.4 GB at 7,900 tokens (with ~0.9 GiB of weights and runtime)
    assert 8 * GIB < plain[-1] < 14 * GIB
    assert lean[-1] < 5 * GIB and lean[-1] < plain[-1] / 2
    assert estimate(2048, checkpointing=True, n_selections=8) > estimate(2048, checkpointing=True)
    assert estimate(2048, checkpointing=True, rows=2) > estimate(2048, checkpointing=True)
    half = estimate_peak_bytes(
        SMOL, prompt_tokens=2032, target_tokens=16, n_selections=1, dtype=torch.bfloat16, checkpointing=True
    )
    assert half < estimate(2048, checkpointing=True)


def test_budget_from_setting_or_available_memory() -> None:
    assert memory_budget_bytes(SimpleNamespace(memory_budget_mb=0)) is None
    assert memory_budget_bytes(SimpleNamespace(memory_budget_mb=300)) == 300 * MIB
    auto = SimpleNamespace(memory_budget_mb=None)
    assert memory_budget_bytes(auto, available=10 * GIB) == 9 * GIB  # 10% margin
    assert memory_budget_bytes(auto, available=2 * GIB) == 2 * GIB - memory.MIN_MARGIN_BYTES
    assert memory_budget_bytes(auto, available=10 * GIB, weights_bytes=GIB) == 8 * GIB
    free = memory.available_bytes()
    assert free is not None and free > 0
    assert memory_budget_bytes(SaliencySettings(_env_file=None)) is not None  # type: ignore[call-arg]


async def test_concurrent_work_is_admitted_by_memory(tiny_llama_dir: Path) -> None:
    """With a budget, the scheduler starts a computation only while the estimates fit (one always may)."""
    serving = build_serving(make_settings(tiny_llama_dir, memory_budget_mb=2048))
    try:
        problem_request = saliency_pb2.SaliencyRequest(prompt="The capital of France is", target=" Paris.")
        await serving.saliency(problem_request)  # warm
        scheduler = next(iter(serving.schedulers.values()))
        assert scheduler.budget_bytes == serving.memory_budget == 2048 * MIB
        costs: list[int] = []
        original = serving.job_cost

        def recording(problem: Any, selections: int, methods: Any) -> int:
            costs.append(original(problem, selections, methods))
            return costs[-1]

        serving.job_cost = recording
        other = saliency_pb2.SaliencyRequest(prompt="The capital of Spain is", target=" Madrid.")
        await serving.saliency(other)
        assert costs and costs[0] > 0  # the estimate is what the ticket reserved
        assert scheduler.bytes_held == 0  # released when done
    finally:
        serving.close()
        await serving.cache.close()


def make_settings(model_dir: Path, **overrides: Any) -> SaliencySettings:
    values: dict[str, Any] = {
        "models": [f"llama={model_dir}"],
        "device": "cpu",
        "dtype": "float32",
        "redis_url": None,
        "cache_max_mb": 16,
        "metrics_port": 0,
    }
    values.update(overrides)
    return SaliencySettings(_env_file=None, **values)  # type: ignore[call-arg]


async def test_request_over_the_budget_is_refused_before_compute(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serving = build_serving(make_settings(tiny_llama_dir, memory_budget_mb=1))
    try:
        assert serving.memory_budget == MIB
        engine = serving.host.default.engine

        def no_compute(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the engine ran for a request that cannot fit")

        monkeypatch.setattr(engine, "saliency_batch", no_compute)
        request = saliency_pb2.SaliencyRequest(prompt="The capital of France is", target=" Paris.")
        with pytest.raises(ResourceExhaustedError) as info:
            await serving.saliency(request)
        message = info.value.message
        assert "SEQSAL_MEMORY_BUDGET_MB" in message and "1 MiB" in message and "tokens" in message
        assert serving.admission.depth == 0
        assert all(s.bytes_held == 0 and s.depth == 0 for s in serving.schedulers.values())
    finally:
        serving.close()
        await serving.cache.close()


async def test_request_within_the_budget_runs(tiny_llama_dir: Path) -> None:
    serving = build_serving(make_settings(tiny_llama_dir, memory_budget_mb=2048))
    try:
        request = saliency_pb2.SaliencyRequest(prompt="The capital of France is", target=" Paris.")
        response = await serving.saliency(request)
        assert [s.method for s in response.scores] == [common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT]
        assert all(s.bytes_held == 0 for s in serving.schedulers.values())
    finally:
        serving.close()
        await serving.cache.close()


def test_max_tokens_defaults_to_the_context() -> None:
    def model(**config: Any) -> Any:
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert _max_tokens(model(max_position_embeddings=8192), None) == 8192
    assert _max_tokens(model(max_position_embeddings=131072), None) == MAX_TOKENS_CAP
    assert _max_tokens(model(n_positions=1024), None) == 1024
    assert _max_tokens(model(max_position_embeddings=8192), 2048) == 2048
    assert _max_tokens(model(max_position_embeddings=8192), 100_000) == 8192
    assert _max_tokens(model(), None) == 4096
    nested = model(text_config=SimpleNamespace(max_position_embeddings=4096))
    assert _max_tokens(nested, None) == 4096
    assert SaliencySettings(_env_file=None).max_tokens is None  # type: ignore[call-arg]
