"""The inference service's logic, independent of gRPC: validate, template, tokenise, call the backend."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from inference_server.backends.base import Backend
from inference_server.chat import apply_chat_template
from inference_server.detokenize import StreamedText, candidate_text, text_token_count
from inference_server.params import sampling_params
from inference_server.settings import InferenceSettings
from seqsal.errors import InvalidArgumentError
from seqsal.v1 import common_pb2, inference_pb2
from server_kit.admission import Admission
from server_kit.model_registry import ModelSpec, model_revision, pick_model
from server_kit.tokenization import ContextLimit, tokenize, tokens_from_ids

logger = logging.getLogger("seqsal.inference")

#: Most targets one Score call may carry: each is a forward pass that holds the model.
MAX_SCORE_TARGETS = 16


@dataclass
class InferenceModel:
    """A model served for generation: its tokenizer, backend and description."""

    spec: ModelSpec
    tokenizer: Any
    backend: Backend
    info: common_pb2.ModelInfo
    load_seconds: float = 0.0

    @property
    def limit(self) -> ContextLimit:
        """The context-length rule for this model: its context (SEQSAL_MAX_MODEL_LEN lowers it)."""
        return ContextLimit(self.spec.id, self.info.max_tokens, "SEQSAL_MAX_MODEL_LEN", self.tokenizer)


def model_info(spec: ModelSpec, backend: Backend, *, context: int, is_default: bool) -> common_pb2.ModelInfo:
    config = json.loads((spec.path / "config.json").read_text())
    architectures = config.get("architectures") or ["unknown"]
    return common_pb2.ModelInfo(
        id=spec.id,
        revision=model_revision(spec.path),
        architecture=architectures[0],
        max_tokens=context,
        dtype=getattr(backend, "dtype_name", ""),
        device=getattr(backend, "device_name", backend.name),
        is_default=is_default,
    )


class InferenceServing:
    """Answers InferenceService calls for a set of models."""

    def __init__(self, models: list[InferenceModel], settings: InferenceSettings) -> None:
        if not models:
            raise ValueError("an inference server needs at least one model")
        self.models = {m.spec.id: m for m in models}
        self.default = models[0]
        self.settings = settings
        # generation calls in flight (the backend batches them); beyond the bound: RESOURCE_EXHAUSTED
        self.inflight = Admission(settings.max_concurrency, "SEQSAL_INFERENCE_MAX_CONCURRENCY")

    def get(self, model_id: str) -> InferenceModel:
        return pick_model(self.models, model_id, self.default)

    async def close(self) -> None:
        for model in self.models.values():
            await model.backend.close()

    # --- helpers -----------------------------------------------------------------------------------

    def _prompt(self, model: InferenceModel, prompt: str, use_chat_template: bool, system_prompt: str) -> str:
        if not prompt:
            raise InvalidArgumentError("prompt is empty; send the text to continue", field="prompt")
        if system_prompt and not use_chat_template:
            raise InvalidArgumentError("system_prompt needs use_chat_template = true", field="system_prompt")
        return apply_chat_template(model.tokenizer, prompt, system_prompt) if use_chat_template else prompt

    def _prompt_ids(self, model: InferenceModel, text: str) -> list[int]:
        model.limit.check("the prompt", "prompt", chars=len(text), room=1)
        tokens = tokenize(model.tokenizer, text, part=common_pb2.PROMPT, add_special_tokens=True)
        model.limit.check("the prompt", "prompt", tokens=len(tokens), room=1)
        return [t.id for t in tokens]

    async def _prepare(
        self, request: inference_pb2.GenerateRequest
    ) -> tuple[InferenceModel, str, list[int], Any]:
        model = self.get(request.model)
        text = self._prompt(model, request.prompt, request.use_chat_template, request.system_prompt)
        ids = await asyncio.to_thread(self._prompt_ids, model, text)
        params = sampling_params(
            request,
            max_candidates=self.settings.max_candidates,
            default_max_tokens=self.settings.default_max_new_tokens,
            room=model.info.max_tokens - len(ids),
        )
        return model, text, ids, params

    # --- RPCs --------------------------------------------------------------------------------------

    async def list_models(self, request: common_pb2.ListModelsRequest) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(models=[m.info for m in self.models.values()])

    async def tokenize(self, request: common_pb2.TokenizeRequest) -> common_pb2.TokenizeResponse:
        model = self.get(request.model)
        part = common_pb2.TARGET if request.as_target else common_pb2.PROMPT
        tokens = await asyncio.to_thread(
            tokenize, model.tokenizer, request.text, part=part, add_special_tokens=not request.as_target
        )
        return common_pb2.TokenizeResponse(tokens=tokens, model=model.spec.id)

    async def generate(self, request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateResponse:
        started = time.perf_counter()
        with self.inflight.hold():
            model, text, ids, params = await self._prepare(request)
            candidates = await model.backend.generate(ids, params)
        return inference_pb2.GenerateResponse(
            candidates=[
                inference_pb2.Candidate(
                    index=c.index,
                    text=candidate_text(model.tokenizer, c.token_ids, params.stop),
                    token_ids=c.token_ids,
                    logprobs=c.logprobs,
                    finish_reason=c.finish_reason,
                    text_token_count=text_token_count(model.tokenizer, c.token_ids, params.stop),
                )
                for c in candidates
            ],
            prompt=text,
            prompt_token_ids=ids,
            model=model.spec.id,
            server_time_ms=(time.perf_counter() - started) * 1000.0,
        )

    async def generate_stream(
        self, request: inference_pb2.GenerateRequest
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        with self.inflight.hold():
            model, text, ids, params = await self._prepare(request)
            first = True
            texts = [StreamedText(model.tokenizer, params.stop) for _ in range(params.n)]
            async for delta in model.backend.generate_stream(ids, params):
                finished = delta.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
                message = inference_pb2.GenerateStreamResponse(
                    index=delta.index,
                    text=texts[delta.index].push(delta.token_ids, finished),
                    token_ids=delta.token_ids,
                    logprobs=delta.logprobs,
                    finish_reason=delta.finish_reason,
                )
                if finished:
                    message.text_token_count = texts[delta.index].text_token_count()
                if first:
                    message.prompt = text
                    message.prompt_token_ids.extend(ids)
                    message.model = model.spec.id
                    first = False
                yield message

    def _score_targets(
        self, model: InferenceModel, prompt_length: int, request: inference_pb2.ScoreRequest
    ) -> list[list[int]]:
        """Each target's token ids; refuses one that cannot fit after ``prompt_length`` prompt tokens
        before tokenising or decoding it."""
        targets: list[list[int]] = []
        for i, target in enumerate(request.targets):
            field = f"targets[{i}]"
            if bool(target.text) == bool(target.token_ids):
                raise InvalidArgumentError(f"{field}: set exactly one of text and token_ids", field=field)
            what = f"prompt + {field}"
            model.limit.check(
                what, field, tokens=prompt_length + len(target.token_ids), chars=len(target.text)
            )
            if target.text:
                tokens = tokenize(
                    model.tokenizer, target.text, part=common_pb2.TARGET, add_special_tokens=False
                )
            else:
                tokens = tokens_from_ids(
                    model.tokenizer,
                    list(target.token_ids),
                    part=common_pb2.TARGET,
                    field=f"{field}.token_ids",
                )
            model.limit.check(what, field, tokens=prompt_length + len(tokens))
            targets.append([t.id for t in tokens])
        return targets

    def _id_prompts(self, model: InferenceModel, request: inference_pb2.ScoreRequest) -> list[list[int]]:
        """The prompts sent as token ids, checked: non-empty, ids of this vocabulary, within the context."""
        for name in ("prompt", "system_prompt"):
            if getattr(request, name):
                raise InvalidArgumentError(
                    f"{name} is set together with prompt_token_ids; send the prompts one way", field=name
                )
        if request.use_chat_template:
            raise InvalidArgumentError(
                "use_chat_template does not apply to prompt_token_ids (they are used as given)",
                field="use_chat_template",
            )
        rows = len(request.prompt_token_ids) * len(request.targets)
        limit = self.settings.max_score_rows
        if rows > limit:
            raise InvalidArgumentError(
                f"prompt_token_ids x targets is {rows} prompt-target pairs; at most {limit} are scored per "
                "call (SEQSAL_MAX_SCORE_ROWS), split them over several calls",
                field="prompt_token_ids",
            )
        vocab = len(model.tokenizer)
        prompts: list[list[int]] = []
        for i, prompt in enumerate(request.prompt_token_ids):
            ids = list(prompt.ids)
            field = f"prompt_token_ids[{i}]"
            if not ids:
                raise InvalidArgumentError(f"{field} is empty; send at least one token id", field=field)
            model.limit.check(field, field, tokens=len(ids), room=1)
            bad = next((j for j, t in enumerate(ids) if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidArgumentError(
                    f"{field}.ids[{bad}] = {ids[bad]} is not a token id of this model (vocabulary size "
                    f"{vocab})",
                    field=field,
                )
            prompts.append(ids)
        return prompts

    async def score(self, request: inference_pb2.ScoreRequest) -> inference_pb2.ScoreResponse:
        model = self.get(request.model)
        by_ids = len(request.prompt_token_ids) > 0
        text = (
            ""
            if by_ids
            else self._prompt(model, request.prompt, request.use_chat_template, request.system_prompt)
        )
        if not request.targets:
            raise InvalidArgumentError("targets is empty; send at least one target to score", field="targets")
        if len(request.targets) > MAX_SCORE_TARGETS:
            raise InvalidArgumentError(
                f"targets has {len(request.targets)} entries; at most {MAX_SCORE_TARGETS} are scored per "
                "call, split them over several calls",
                field="targets",
            )
        # tokenising (a target may be a megabyte) runs in a worker thread, never on the event loop
        if by_ids:
            prompts = await asyncio.to_thread(self._id_prompts, model, request)
            ids: list[int] = []
        else:
            ids = await asyncio.to_thread(self._prompt_ids, model, text)
            prompts = [ids]
        longest = max(len(p) for p in prompts)
        targets = await asyncio.to_thread(self._score_targets, model, longest, request)
        rows = [(prompt, target) for prompt in prompts for target in targets]
        with self.inflight.hold():
            logprobs = await model.backend.score_rows(rows)
        return inference_pb2.ScoreResponse(
            scores=[
                inference_pb2.TargetScore(
                    token_ids=target,
                    logprobs=lp,
                    total_logprob=float(sum(lp)),
                    prompt_index=i // len(targets),
                )
                for i, ((_, target), lp) in enumerate(zip(rows, logprobs, strict=True))
            ],
            prompt=text,
            prompt_token_ids=ids,
            model=model.spec.id,
        )
