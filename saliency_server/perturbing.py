"""Where the perturbation methods and Verify get their variants scored, and how they are answered.

Every perturbed prompt of one request (OCCLUSION's one per segment, LIME's samples, Verify's
ablations) goes out as one batched scoring job:

* through the inference server's ``Score`` RPC (prompts as token ids, the target's ids, all in
  one call: vLLM batches them) when ``SEQSAL_SCORE_ADDRESS`` names an inference server that hosts
  the same model at the same revision;
* otherwise (none configured, another revision, or the server unavailable) in this process, as
  batched no-grad forward passes on the saliency engine (``GradientEngine.score_rows``), as a
  ticket of the model's scheduler: it waits for its turn, gives way to interactive work at every
  batch and decoder layer, and stops when its client goes away.

Either way the response says where (``MethodScores.scored_by``, ``VerifyResponse.scored_by``).

This module knows nothing of the serving layer (:mod:`saliency_server.serving`): it gets the
scheduler, engines, admission and worker threads it scores on, and hands back entries and Verify
answers; serving caches them and shares them with the requests that join them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from saliency_server import perturbation
from saliency_server.engine_client import SaliencyEngine
from saliency_server.perturbation import Scorer
from saliency_server.scheduler import Priority, Scheduler, TicketSteps
from saliency_server.scores import MethodEntry
from saliency_server.settings import SaliencySettings
from saliency_server.validation import Problem, problem_message
from seqsal.errors import InvalidArgumentError, SeqsalError, UnavailableError
from seqsal.v1 import common_pb2, inference_pb2, saliency_pb2
from server_kit.admission import Admission
from server_kit.threads import stream_from_thread

if TYPE_CHECKING:
    from seqsal.client import AsyncInferenceClient

logger = logging.getLogger("seqsal.saliency")

#: How long the answer to "does the inference server host this model at this revision?" is kept.
REMOTE_CHECK_S = 30.0
#: Deadline of one Score call to the inference server.
SCORE_TIMEOUT_S = 600.0


@dataclass
class Scored:
    """Log-probs of the target (and foil) after every row of a plan, and where they were computed."""

    target: list[np.ndarray]
    foil: list[np.ndarray] | None
    scorer: Scorer


@dataclass(frozen=True)
class VerifyOptions:
    """What a Verify call asks besides its problem: the one method checked, the sorted distinct
    ks, the random draws per k and their seed (all of it decides the answer)."""

    method: int
    ks: tuple[int, ...]
    draws: int
    seed: int

    def key_fields(self) -> dict[str, object]:
        return {"k": list(self.ks), "random_draws": self.draws, "seed": self.seed}


def verify_options(request: saliency_pb2.VerifyRequest) -> VerifyOptions:
    """The options of ``request``, checked before its problem is built (INVALID_ARGUMENT naming the field)."""
    wanted = problem_message(request.problem, prefix="problem.")
    if len(wanted.methods) != 1:
        raise InvalidArgumentError(
            f"problem.methods has {len(wanted.methods)} entries; Verify checks exactly one method",
            field="problem.methods",
        )
    if wanted.granularity == common_pb2.GRANULARITY_UNSPECIFIED:
        raise InvalidArgumentError(
            "problem.granularity is required: Verify removes the explanation's top segments at it "
            "(e.g. SENTENCES)",
            field="problem.granularity",
        )
    ks, draws = perturbation.validate_verify(list(request.k), request.random_draws)
    return VerifyOptions(wanted.methods[0], tuple(ks), draws, int(request.seed))


def check_verify_count(problem: Problem, options: VerifyOptions, max_perturbations: int) -> None:
    """INVALID_ARGUMENT when the call would score more than ``max_perturbations`` prompts."""
    count = perturbation.verify_count(len(problem.features), options.ks, options.draws)
    perturbation.check_count(
        count,
        max_perturbations,
        what=f"Verify with k = {list(options.ks)} and {options.draws} draws",
        field="random_draws",
    )


class PerturbationScoring:
    """The perturbation side of one saliency service: it scores on the inference server or on
    ``engines``, as tickets of ``schedulers``, holding a place of ``admission`` and a thread of
    ``executor`` while it does."""

    def __init__(
        self,
        settings: SaliencySettings,
        *,
        admission: Admission,
        schedulers: Mapping[str, Scheduler],
        engines: Mapping[str, SaliencyEngine],
        executor: Executor,
    ) -> None:
        self.settings = settings
        self.admission = admission
        self.schedulers = schedulers
        self.engines = engines
        self.executor = executor
        self.address = self.settings.score_address
        self._client: AsyncInferenceClient | None = None
        self._remote_models: tuple[float, dict[str, common_pb2.ModelInfo] | None, str] = (-1e9, None, "")

    # --- where to score ------------------------------------------------------------------------

    def _inference(self) -> AsyncInferenceClient:
        from seqsal.client import AsyncInferenceClient

        if self._client is None:
            assert self.address is not None
            self._client = AsyncInferenceClient(
                self.address, settings=self.settings, max_message_mb=self.settings.max_message_mb
            )
        return self._client

    async def _remote_info(self, problem: Problem) -> tuple[common_pb2.ModelInfo | None, str]:
        """The inference server's entry for the problem's model, or None and why not."""
        if not self.address:
            return None, "no inference server configured"
        checked, models, why = self._remote_models
        if time.monotonic() - checked > REMOTE_CHECK_S:
            try:
                listed = await self._inference().list_models(timeout=10.0)
                models, why = {m.id: m for m in listed.models}, ""
            except SeqsalError as error:
                models, why = None, f"inference server at {self.address} unavailable: {error.message}"
            self._remote_models = (time.monotonic(), models, why)
        if models is None:
            return None, why
        info = problem.hosted.info
        remote = models.get(info.id)
        if remote is None or remote.revision != info.revision:
            return (
                None,
                f"the inference server at {self.address} does not host {info.id} at revision {info.revision}",
            )
        return remote, ""

    async def scorer(self, problem: Problem) -> Scorer:
        """Where the variants of ``problem`` are scored now: the inference server when it hosts
        the model at the same revision, else this process (and why)."""
        remote, why = await self._remote_info(problem)
        if remote is not None:
            return self._remote_scorer(remote)
        return self._local_scorer(problem, why)

    def _remote_scorer(self, remote: common_pb2.ModelInfo) -> Scorer:
        described = f"inference server {self.address} ({remote.device}, {remote.dtype})"
        return Scorer("inference", remote.revision, remote.dtype, remote.device, described)

    @staticmethod
    def _local_scorer(problem: Problem, why: str) -> Scorer:
        info = problem.hosted.info
        described = f"saliency server (transformers, {info.device}, {info.dtype}; {why})"
        return Scorer("local", info.revision, info.dtype, info.device, described)

    async def score(
        self, problem: Problem, rows: Sequence[Sequence[int]], priority: Priority, client: str
    ) -> Scored:
        """The target's (and foil's) log-probs after each prompt of ``rows``, in one batched job."""
        inputs = problem.inputs
        targets = [list(inputs.target_ids)] + ([list(inputs.foil_ids)] if inputs.foil_ids is not None else [])
        remote, why = await self._remote_info(problem)
        flat: list[np.ndarray] | None = None
        if remote is not None:
            try:
                flat = await self._score_remote(problem, rows, targets)
                scorer = self._remote_scorer(remote)
            except UnavailableError as error:
                why = f"inference server at {self.address} unavailable: {error.message}"
                self._remote_models = (time.monotonic(), None, why)
                logger.warning("scoring perturbations in-process: %s", why)
        if flat is None:
            flat = await self._score_locally(
                problem, [(r, t) for r in rows for t in targets], priority, client
            )
            scorer = self._local_scorer(problem, why)
        n = len(targets)
        return Scored(
            target=flat[0::n], foil=flat[1::n] if inputs.foil_ids is not None else None, scorer=scorer
        )

    async def _score_remote(
        self, problem: Problem, rows: Sequence[Sequence[int]], targets: list[list[int]]
    ) -> list[np.ndarray]:
        """One Score call per ``SEQSAL_MAX_SCORE_ROWS`` prompt-target pairs, all sent at once."""
        per_call = max(1, self.settings.max_score_rows // len(targets))
        chunks = [rows[i : i + per_call] for i in range(0, len(rows), per_call)]
        client = self._inference()
        requests = [
            inference_pb2.ScoreRequest(
                model=problem.hosted.id,
                prompt_token_ids=[inference_pb2.TokenIds(ids=list(r)) for r in chunk],
                targets=[inference_pb2.ScoreTarget(token_ids=t) for t in targets],
            )
            for chunk in chunks
        ]
        responses = await asyncio.gather(*(client.score(r, timeout=SCORE_TIMEOUT_S) for r in requests))
        return [np.asarray(s.logprobs, dtype=np.float32) for response in responses for s in response.scores]

    async def _score_locally(
        self,
        problem: Problem,
        rows: list[tuple[Sequence[int], Sequence[int]]],
        priority: Priority,
        client: str,
    ) -> list[np.ndarray]:
        """Batched no-grad passes on the engine, as a ticket of the model's scheduler."""
        model = problem.hosted.id
        self.admission.acquire()
        scheduler = self.schedulers[model]
        ticket = scheduler.submit(client, priority, label=f"{len(rows)} perturbed prompts")
        engine = self.engines[model]
        steps = TicketSteps(scheduler, ticket)

        def produce(emit: Callable[[list[np.ndarray]], None], stopped: Callable[[], bool]) -> None:
            ticket.stopped = stopped
            try:
                emit(
                    engine.score_rows(
                        rows, batch_tokens=self.settings.score_batch_tokens, cancelled=stopped, steps=steps
                    )
                )
            finally:
                scheduler.finish(ticket)

        try:
            async with aclosing(stream_from_thread(produce, self.executor)) as stream:
                async for result in stream:
                    return result
            raise RuntimeError("the scoring worker returned nothing")
        finally:
            scheduler.cancel(ticket)  # nothing once finished
            self.admission.release()

    # --- the methods -------------------------------------------------------------------------------

    def _empty(self, problem: Problem) -> list[int]:
        tokenizer = problem.hosted.tokenizer
        for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
            if token_id is not None:
                return [int(token_id)]
        return [0]

    async def entries(
        self,
        problem: Problem,
        masks: Sequence[np.ndarray],
        methods: Sequence[int],
        priority: Priority,
        client: str,
    ) -> tuple[Scorer, list[dict[int, MethodEntry]]]:
        """The perturbation methods' entries for each selection of ``masks`` (one scoring job for
        all), and the scorer that scored them (the problem's, unless the inference server went
        away meanwhile: they are cached under it)."""
        spec = problem.perturbation
        features = problem.features
        plan = perturbation.plan_methods(
            problem.inputs.prompt_ids, features, methods, spec, self._empty(problem)
        )
        scored = await self.score(problem, plan.rows, priority, client)
        n_tokens = len(problem.tokens)
        out: list[dict[int, MethodEntry]] = []
        for mask in masks:
            objective = perturbation.objectives(scored.target, scored.foil, mask)
            found: dict[int, MethodEntry] = {}
            for method in methods:
                effects, r2 = perturbation.method_effects(plan, method, objective, spec)
                found[method] = MethodEntry(
                    scores=perturbation.token_scores(n_tokens, features, effects.tolist()),
                    target_token_logprobs=scored.target[0].copy(),
                    target_logprob=float(scored.target[0][mask].astype(np.float64).sum()),
                    foil_logprob=None
                    if scored.foil is None
                    else float(scored.foil[0].astype(np.float64).sum()),
                    ig_residual=None,
                    ig_steps=0,
                    r2=r2,
                    perturbations=len(plan.occlusion if method == common_pb2.OCCLUSION else plan.lime),
                    scored_by=scored.scorer.described,
                )
            out.append(found)
        return scored.scorer, out

    # --- Verify ------------------------------------------------------------------------------------

    async def verify(
        self,
        problem: Problem,
        mask: np.ndarray,
        explanation: saliency_pb2.SaliencyResponse,
        options: VerifyOptions,
        priority: Priority,
        client: str,
    ) -> tuple[saliency_pb2.VerifyResponse, Scorer]:
        """The ablation test of ``explanation`` (the Saliency answer to ``problem`` for
        ``options.method``), and the scorer that scored its variants; ``server_time_ms`` is the
        caller's to set."""
        features = problem.features
        token_scores = explanation.scores[0].scores
        plan = perturbation.plan_verify(
            problem.inputs.prompt_ids,
            features,
            perturbation.feature_scores(features, token_scores),
            options.ks,
            options.draws,
            options.seed,
            self._empty(problem),
        )
        scored = await self.score(problem, plan.plan.rows, priority, client)
        objective = perturbation.objectives(scored.target, scored.foil, mask)
        full = float(objective[0])
        response = saliency_pb2.VerifyResponse(
            saliency=explanation,
            method=options.method,
            full_logprob=full,
            removable_segments=len(features),
            scored_by=scored.scorer.described,
            perturbations=len(plan.plan.rows) - 1,
        )
        for k in plan.ks:
            top = plan.ranking[:k]
            drops = [full - float(objective[row]) for row in plan.random[k]]
            response.steps.append(
                saliency_pb2.VerifyStep(
                    k=k,
                    segment_indices=[features[f].segment for f in top],
                    topk_removed_logprob=float(objective[plan.top[k]]),
                    topk_drop=full - float(objective[plan.top[k]]),
                    random_drops=drops,
                    random_drop_mean=float(np.mean(drops)),
                    random_drop_std=float(np.std(drops)),
                    topk_only_logprob=float(objective[plan.only[k]]),
                    ablated_prompt=perturbation.ablated_text(problem.tokens, features, top),
                    ablated_prompt_token_ids=plan.plan.rows[plan.top[k]],
                )
            )
        return response, scored.scorer
