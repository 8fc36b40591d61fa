"""The saliency service's logic, independent of gRPC: validate, look up the cache, compute, answer.

Both the gRPC servicer and the CLI's in-process mode call this class with
wire messages (``seqsal.v1``) and get wire messages back, so the two paths
cannot drift apart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from saliency_server.engine import SaliencyResult
from saliency_server.memory import check_fits, memory_budget_bytes
from saliency_server.model_host import ModelHost
from saliency_server.validation import Problem, build_problem, resolve_selection
from seqsal import segmentation
from seqsal.admission import Admission
from seqsal.cache import CacheBackend, SingleFlight, get_entry, make_key, put_entry
from seqsal.settings import Settings
from seqsal.threads import stream_from_thread
from seqsal.tokenization import tokenize
from seqsal.v1 import common_pb2, saliency_pb2

logger = logging.getLogger("seqsal.saliency")


@dataclass
class MethodEntry:
    """One method's cached or computed scores for one selection."""

    scores: np.ndarray
    target_token_logprobs: np.ndarray
    target_logprob: float
    foil_logprob: float | None
    ig_residual: float | None
    ig_steps: int


def _entries_from_result(result: SaliencyResult) -> dict[int, MethodEntry]:
    return {
        method: MethodEntry(
            scores=scores,
            target_token_logprobs=result.target_token_logprobs,
            target_logprob=result.target_logprob,
            foil_logprob=result.foil_logprob,
            ig_residual=result.ig_residual if method == common_pb2.INTEGRATED_GRADIENTS else None,
            ig_steps=result.ig_steps if method == common_pb2.INTEGRATED_GRADIENTS else 0,
        )
        for method, scores in result.scores.items()
    }


class SaliencyServing:
    """Answers SaliencyService calls for the models of one :class:`ModelHost`."""

    def __init__(self, host: ModelHost, cache: CacheBackend, settings: Settings) -> None:
        self.host = host
        self.cache = cache
        self.settings = settings
        # the models are loaded: what is available now is what computations may use
        self.memory_budget = memory_budget_bytes(settings)
        self.admission = Admission(settings.max_concurrency, settings.max_queue, self.memory_budget)
        self.flight = SingleFlight()
        self.executor = ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix="seqsal-saliency"
        )

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # --- simple calls ------------------------------------------------------------------------------

    async def list_models(self, request: common_pb2.ListModelsRequest) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(models=self.host.infos())

    async def tokenize(self, request: common_pb2.TokenizeRequest) -> common_pb2.TokenizeResponse:
        hosted = self.host.get(request.model)
        part = common_pb2.TARGET if request.as_target else common_pb2.PROMPT
        tokens = await asyncio.to_thread(
            tokenize, hosted.tokenizer, request.text, part=part, add_special_tokens=not request.as_target
        )
        return common_pb2.TokenizeResponse(tokens=tokens, model=hosted.id)

    # --- saliency ----------------------------------------------------------------------------------

    async def _problem(
        self,
        request: saliency_pb2.SaliencyRequest | saliency_pb2.SaliencyAllSegmentsRequest,
        *,
        all_segments: bool,
    ) -> Problem:
        hosted = self.host.get(request.model)
        return await asyncio.to_thread(
            build_problem,
            hosted,
            prompt=request.prompt,
            target=request.target,
            target_token_ids=list(request.target_token_ids),
            methods=list(request.methods),
            foil=request.foil if request.HasField("foil") else None,
            granularity=request.granularity,
            custom_regex=request.custom_regex,
            ig_steps=request.ig_steps,
            default_ig_steps=self.settings.ig_steps,
            require_granularity=all_segments,
        )

    def cache_key(self, problem: Problem, method: int, mask: np.ndarray) -> str:
        """The cache key of one method's scores for one selection."""
        info = problem.hosted.info
        inputs = problem.inputs
        fields = {
            "model": info.id,
            "revision": info.revision,
            "dtype": info.dtype,
            "method": common_pb2.Method.Name(method),
            "ig_steps": problem.ig_steps if method == common_pb2.INTEGRATED_GRADIENTS else 0,
            "prompt_ids": list(inputs.prompt_ids),
            "target_ids": list(inputs.target_ids),
            "selection": "".join("1" if b else "0" for b in mask),
            "foil_ids": None if inputs.foil_ids is None else list(inputs.foil_ids),
        }
        return make_key(self.settings.cache_prefix, "saliency", fields)

    async def _cached(self, problem: Problem, mask: np.ndarray) -> dict[int, MethodEntry]:
        found: dict[int, MethodEntry] = {}
        for method in problem.methods:
            entry = await get_entry(self.cache, self.cache_key(problem, method, mask))
            if entry is None:
                continue
            meta, arrays = entry
            found[method] = MethodEntry(
                scores=arrays["scores"],
                target_token_logprobs=arrays["target_token_logprobs"],
                target_logprob=float(meta["target_logprob"]),
                foil_logprob=meta.get("foil_logprob"),
                ig_residual=meta.get("ig_residual"),
                ig_steps=int(meta.get("ig_steps", 0)),
            )
        return found

    async def _store(self, problem: Problem, mask: np.ndarray, entries: dict[int, MethodEntry]) -> None:
        for method, entry in entries.items():
            meta = {
                "target_logprob": entry.target_logprob,
                "foil_logprob": entry.foil_logprob,
                "ig_residual": entry.ig_residual,
                "ig_steps": entry.ig_steps,
            }
            arrays = {"scores": entry.scores, "target_token_logprobs": entry.target_token_logprobs}
            await put_entry(self.cache, self.cache_key(problem, method, mask), meta, arrays)

    async def _compute(
        self, problem: Problem, masks: np.ndarray, methods: Sequence[int]
    ) -> AsyncIterator[SaliencyResult]:
        """Run the engine in a worker thread under admission control, yielding results as they come.

        If the caller stops listening (client cancelled, deadline passed), the engine stops at its
        next checkpoint.
        """
        cost = check_fits(
            problem.hosted.engine,
            problem.inputs,
            n_selections=len(masks),
            methods=methods,
            ig_steps=problem.ig_steps,
            budget=self.memory_budget,
            model_id=problem.hosted.id,
        )
        async with self.admission.slot(cost):

            def produce(emit: Callable[[SaliencyResult], None], stopped: Callable[[], bool]) -> None:
                for result in problem.hosted.engine.saliency_batch(
                    problem.inputs, masks, methods, ig_steps=problem.ig_steps, cancelled=stopped
                ):
                    emit(result)

            async for result in stream_from_thread(produce, self.executor):
                yield result

    def _response(
        self,
        problem: Problem,
        mask: np.ndarray,
        entries: dict[int, MethodEntry],
        *,
        cache_hit: bool,
        started: float,
    ) -> saliency_pb2.SaliencyResponse:
        info = problem.hosted.info
        tokens = problem.tokens
        first = entries[problem.methods[0]]
        response = saliency_pb2.SaliencyResponse(
            tokens=tokens,
            granularity=problem.granularity,
            target_mask=[bool(b) for b in mask],
            target_logprob=first.target_logprob,
            target_token_logprobs=first.target_token_logprobs.tolist(),
            model=info.id,
            revision=info.revision,
            dtype=info.dtype,
            device=info.device,
            cache_hit=cache_hit,
        )
        if first.foil_logprob is not None:
            response.foil_logprob = first.foil_logprob
        for method in problem.methods:
            entry = entries[method]
            scores = saliency_pb2.MethodScores(method=method, scores=entry.scores.tolist())
            if method == common_pb2.INTEGRATED_GRADIENTS:
                scores.ig_steps = entry.ig_steps
                if entry.ig_residual is not None:
                    scores.completeness_residual = entry.ig_residual
            response.scores.append(scores)
        if problem.granularity != common_pb2.GRANULARITY_UNSPECIFIED:
            segments = problem.segments
            response.segments.extend(
                segmentation.with_scores(segments, [entries[m].scores for m in problem.methods])
            )
        response.server_time_ms = (time.perf_counter() - started) * 1000.0
        return response

    async def saliency(self, request: saliency_pb2.SaliencyRequest) -> saliency_pb2.SaliencyResponse:
        """Saliency for one selection: from the cache, or one forward and one backward pass."""
        started = time.perf_counter()
        problem = await self._problem(request, all_segments=False)
        mask = resolve_selection(problem, request)
        entries = await self._cached(problem, mask)
        missing = [m for m in problem.methods if m not in entries]
        cache_hit = not missing
        if missing:
            flight_key = "|".join(self.cache_key(problem, m, mask) for m in missing)

            async def compute() -> dict[int, MethodEntry]:
                results = [r async for r in self._compute(problem, mask[None, :], missing)]
                computed = _entries_from_result(results[0])
                await self._store(problem, mask, computed)
                return computed

            computed, _shared = await self.flight.run(flight_key, compute)
            entries.update(computed)
        return self._response(problem, mask, entries, cache_hit=cache_hit, started=started)

    async def saliency_all_segments(
        self, request: saliency_pb2.SaliencyAllSegmentsRequest
    ) -> AsyncIterator[saliency_pb2.SaliencyAllSegmentsResponse]:
        """Saliency for every target segment: cached ones first, the rest from one batched computation."""
        started = time.perf_counter()
        problem = await self._problem(request, all_segments=True)
        segments = problem.segments
        targets = segmentation.segment_target_masks(problem.tokens, segments)
        count = len(targets)

        def message(
            index: int, entries: dict[int, MethodEntry], cache_hit: bool
        ) -> saliency_pb2.SaliencyAllSegmentsResponse:
            segment, mask = targets[index]
            saliency = self._response(
                problem, np.asarray(mask), entries, cache_hit=cache_hit, started=started
            )
            scored = segmentation.with_scores([segment], [entries[m].scores for m in problem.methods])[0]
            return saliency_pb2.SaliencyAllSegmentsResponse(
                segment_index=index, segment_count=count, target_segment=scored, saliency=saliency
            )

        pending: list[int] = []
        for index, (_, mask) in enumerate(targets):
            entries = await self._cached(problem, np.asarray(mask))
            if len(entries) == len(problem.methods):
                yield message(index, entries, True)
            else:
                pending.append(index)
        if not pending:
            return
        masks = np.asarray([targets[i][1] for i in pending], dtype=bool)
        position = 0
        async for result in self._compute(problem, masks, problem.methods):
            index = pending[position]
            entries = _entries_from_result(result)
            await self._store(problem, masks[position], entries)
            position += 1
            yield message(index, entries, False)
