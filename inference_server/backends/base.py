"""The one seam every generation backend implements.

Backends work on token ids, never on text: the serving layer tokenises the
prompt with the model's one tokenisation (``server_kit.tokenization``) and hands
the ids over, so the ids a backend generates from are exactly the ids the
saliency service later explains; it also derives each candidate's text from
the returned ids (``inference_server.detokenize``), the same way for every backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from seqsal.v1 import inference_pb2


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings (see ``inference_server.params``)."""

    n: int = 1
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GeneratedCandidate:
    """One finished candidate."""

    index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: int = inference_pb2.STOP


@dataclass
class CandidateDelta:
    """New output of one candidate since its previous delta."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: int = inference_pb2.FINISH_REASON_UNSPECIFIED


class Backend(ABC):
    """Generation and teacher-forced scoring for one model."""

    #: Short name for logs and ListModels ("vllm", "transformers", "openai").
    name: str = "backend"
    #: Most tokens (prompt + generated) per sequence; set by the backend once started.
    context: int = 2048
    #: Torch dtype and device the model runs in, for ListModels.
    dtype_name: str = ""
    device_name: str = ""

    @abstractmethod
    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[GeneratedCandidate]:
        """``params.n`` candidates continuing ``prompt_ids``, by index."""

    @abstractmethod
    def generate_stream(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[CandidateDelta]:
        """The same candidates as :meth:`generate`, as deltas while they are produced.

        Each candidate's last delta has its ``finish_reason`` set.
        """

    @abstractmethod
    async def score_rows(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[list[float]]:
        """``log p(target_t | prompt, target_<t)`` for every token of every ``(prompt ids, target
        ids)`` row, in row order: many prompts (e.g. perturbed variants) in one batched call."""

    async def score(self, prompt_ids: Sequence[int], targets: Sequence[Sequence[int]]) -> list[list[float]]:
        """``log p(target_t | prompt, target_<t)`` for every token of every target of one prompt."""
        return await self.score_rows([(prompt_ids, target) for target in targets])

    async def start(self) -> None:  # noqa: B027 (optional hook)
        """Load weights or connect; called once before serving."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the engine; called once at shutdown."""
