"""Generation with transformers in-process: the backend for hosts where vLLM cannot be installed.

Same contract as the vLLM backend: logprobs are those of the model's
distribution before temperature and top-p/top-k (after any penalties the
model's generation config sets), and the end-of-sequence token and the tokens
that complete a stop string are kept in ``token_ids`` (the serving layer cuts
the text). A client that goes away stops the generation at the next token.
One generation runs at a time per model.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from inference_server.backends.base import Backend, CandidateDelta, GeneratedCandidate, SamplingParams
from inference_server.settings import InferenceSettings
from seqsal.errors import CancelledError
from seqsal.v1 import inference_pb2
from server_kit.model_registry import ModelSpec, load_causal_lm, resolve_device, resolve_dtype
from server_kit.teacher_forcing import score_rows
from server_kit.threads import stream_from_thread


class _RawLogprobs(LogitsProcessor):
    """Records log-softmax of the raw logits at every step (it runs first, before any warper)."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.steps.append(torch.log_softmax(scores.float(), dim=-1))
        return scores


@dataclass
class _Row:
    """Progress of one candidate."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sent: int = 0  # tokens already handed out
    finish: int = inference_pb2.FINISH_REASON_UNSPECIFIED


class _Collector(BaseStreamer, StoppingCriteria):
    """Turns generate()'s token stream into candidate deltas; stops rows at EOS, stop strings, or
    when the consumer has gone away (``stopped``)."""

    def __init__(
        self,
        n: int,
        tokenizer: Any,
        stop: Sequence[str],
        eos_ids: set[int],
        recorder: _RawLogprobs,
        emit: Callable[[CandidateDelta], None],
        stopped: Callable[[], bool],
    ) -> None:
        self.rows = [_Row() for _ in range(n)]
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.eos_ids = eos_ids
        self.recorder = recorder
        self.emit = emit
        self.stopped = stopped
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first sends the prompt
            self.prompt_seen = True
            return
        logprobs = self.recorder.steps[-1]
        tokens = value.view(-1).tolist()
        for i, row in enumerate(self.rows):
            if row.finish:
                continue
            token = tokens[i]
            row.ids.append(token)
            row.logprobs.append(float(logprobs[i, token]))
            if token in self.eos_ids or self._hit_stop_string(row):
                row.finish = inference_pb2.STOP
            self._send(i, row)

    def _hit_stop_string(self, row: _Row) -> bool:
        if not self.stop:
            return False
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        return any(s in text for s in self.stop)

    def _send(self, index: int, row: _Row) -> None:
        self.emit(
            CandidateDelta(
                index=index,
                token_ids=row.ids[row.sent :],
                logprobs=row.logprobs[row.sent :],
                finish_reason=row.finish,
            )
        )
        row.sent = len(row.ids)

    def finish_rest(self) -> None:
        """Rows still open when generate() returns ran out of tokens (or were abandoned)."""
        reason = inference_pb2.ABORT if self.stopped() else inference_pb2.LENGTH
        for i, row in enumerate(self.rows):
            if not row.finish:
                row.finish = reason
                self._send(i, row)

    def end(self) -> None:
        pass

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        abandoned = self.stopped()
        return torch.tensor([abandoned or bool(r.finish) for r in self.rows], device=input_ids.device)


class TransformersBackend(Backend):
    """``AutoModelForCausalLM.generate`` in a worker thread."""

    name = "transformers"

    def __init__(self, spec: ModelSpec, tokenizer: Any, settings: InferenceSettings) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.settings = settings
        self.model: Any = None
        self._lock = threading.Lock()

    async def start(self) -> None:
        device = resolve_device(self.settings.device)
        dtype = resolve_dtype(self.settings.dtype_for(self.spec.id), device)
        self.model = await asyncio.to_thread(load_causal_lm, self.spec.path, device, dtype)
        config = self.model.config
        limit = (
            getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        )
        self.context = min(int(limit), self.settings.max_model_len or int(limit))
        self.dtype_name = str(dtype).removeprefix("torch.")
        self.device_name = str(device)

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _run(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        emit: Callable[[CandidateDelta], None],
        stopped: Callable[[], bool],
    ) -> None:
        recorder = _RawLogprobs()
        collector = _Collector(
            params.n, self.tokenizer, params.stop, self._eos_ids(), recorder, emit, stopped
        )
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([list(prompt_ids)] * params.n, device=device)
        kwargs: dict[str, Any] = {"do_sample": not params.greedy}
        if not params.greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = next(iter(self._eos_ids()), 0)
        with self._lock, torch.no_grad():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=params.max_tokens,
                logits_processor=LogitsProcessorList([recorder]),
                stopping_criteria=StoppingCriteriaList([collector]),
                streamer=collector,
                pad_token_id=pad,
                eos_token_id=list(self._eos_ids()) or None,
                **kwargs,
            )
        collector.finish_rest()

    async def generate_stream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[CandidateDelta]:
        def produce(emit: Callable[[CandidateDelta], None], stopped: Callable[[], bool]) -> None:
            self._run(prompt_ids, params, emit, stopped)

        async for delta in stream_from_thread(produce):
            yield delta

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[GeneratedCandidate]:
        candidates = [GeneratedCandidate(index=i, token_ids=[], logprobs=[]) for i in range(params.n)]
        async for delta in self.generate_stream(prompt_ids, params):
            candidate = candidates[delta.index]
            candidate.token_ids.extend(delta.token_ids)
            candidate.logprobs.extend(delta.logprobs)
            if delta.finish_reason:
                candidate.finish_reason = delta.finish_reason
        return candidates

    async def score_rows(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[list[float]]:
        """Batched no-grad passes (``server_kit.teacher_forcing``) in a worker thread; a client that
        goes away stops it before the next batch."""

        def produce(emit: Callable[[list[list[float]]], None], stopped: Callable[[], bool]) -> None:
            def between() -> None:
                if stopped():
                    raise CancelledError("score cancelled by the client or its deadline passed")

            with self._lock:
                scores = score_rows(
                    self.model, rows, batch_tokens=self.settings.score_batch_tokens, between=between
                )
            emit([lp.tolist() for lp in scores])

        async for result in stream_from_thread(produce):
            return result
        raise CancelledError("score cancelled")
