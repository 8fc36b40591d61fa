"""What a side explains and how it is asked: the target (a generated response, a reference or a
foil), the SaliencyRequest for a selection, the Saliency call, and a session's recent responses.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from seqsal import client as client_requests
from seqsal.v1 import saliency_pb2
from ui.clients import POOL, Endpoints, TargetProblem, guard
from ui.generation import Generation
from ui.state import PERTURBATION_METHODS, SideState, granularity_enum, method_enum


def methods_for(method: str) -> list[int]:
    """Methods to ask for: the two gradient methods share one backward pass, so ask for both."""
    if method in ("INTEGRATED_GRADIENTS", *PERTURBATION_METHODS):
        return [method_enum(method)]
    return [method_enum("GRAD_L2"), method_enum("GRAD_DOT_INPUT")]


def method_index(response: saliency_pb2.SaliencyResponse, method: str) -> int:
    """Index of ``method`` in ``response.scores`` (0 if absent)."""
    wanted = method_enum(method)
    for i, scores in enumerate(response.scores):
        if scores.method == wanted:
            return i
    return 0


@dataclass(frozen=True)
class TargetSpec:
    """What a side explains: prompt (as the model saw it), target (ids or text) and foil."""

    prompt: str
    model: str
    target_token_ids: tuple[int, ...] = ()
    #: the prompt's ids as the model saw them (from Generate): sent instead of the text, so the
    #: saliency server never tokenises a chat-templated prompt again
    prompt_token_ids: tuple[int, ...] = ()
    target_text: str = ""
    foil: str | None = None
    #: Short words for the heading, e.g. "generated response 1".
    label: str = ""


def needs_generation(side: SideState) -> bool:
    """Whether explaining the side needs its generation first: the target is a generated response,
    or the chat template (applied by the inference server) makes the prompt. A reference target is
    explained on the prompt as typed (so its first heatmap waits for no generation)."""
    reference = side.target_kind == "reference" or (side.target_kind == "foil" and side.reference.strip())
    return side.chat_template or not reference


def target_spec(side: SideState, generation: Generation | None) -> TargetSpec:
    """The target of a side; :class:`TargetProblem` when it cannot be explained yet."""
    prompt = generation.prompt if generation is not None else ""
    prompt_ids = generation.prompt_token_ids if generation is not None else ()
    model = generation.model if generation is not None else side.model
    if generation is None:
        if side.chat_template:
            raise TargetProblem(
                "No response yet. The chat template is applied by the inference server; once it "
                "answers, the response and the templated prompt appear here."
            )
        if side.target_kind == "candidate" or (side.target_kind == "foil" and not side.reference.strip()):
            raise TargetProblem("No response yet: generate one, or type a reference target to explain.")
        prompt = side.prompt
    foil: str | None = None
    if side.target_kind == "foil":
        if not side.foil:
            raise TargetProblem("Type a foil: the alternative text the target is contrasted with.")
        foil = side.foil
    if side.target_kind == "reference" or (side.target_kind == "foil" and side.reference.strip()):
        if not side.reference:
            raise TargetProblem("Type a reference target: the text whose saliency you want to see.")
        return TargetSpec(
            prompt=prompt,
            model=model,
            prompt_token_ids=prompt_ids,
            target_text=side.reference,
            foil=foil,
            label="reference target",
        )
    assert generation is not None
    if not generation.candidates:
        raise TargetProblem("The model returned no candidates; generate again.")
    index = min(side.candidate, len(generation.candidates) - 1)
    candidate = generation.candidates[index]
    if not candidate.shown_token_ids:
        raise TargetProblem(
            "The model's response is empty (it stopped at once). Edit the prompt, raise the "
            "temperature, or type a reference target."
        )
    label = "generated response" + (f" {index + 1}" if len(generation.candidates) > 1 else "")
    return TargetSpec(
        prompt=prompt,
        model=model,
        prompt_token_ids=prompt_ids,
        target_token_ids=candidate.shown_token_ids,
        foil=foil,
        label=label,
    )


def saliency_request(
    spec: TargetSpec,
    side: SideState,
    *,
    granularity: str,
    target_mask: Sequence[bool] = (),
) -> saliency_pb2.SaliencyRequest:
    """The SaliencyRequest for a target, a granularity and a selection mask (empty = whole target)."""
    return client_requests.saliency_request(
        model=spec.model,
        prompt="" if spec.prompt_token_ids else spec.prompt,
        prompt_token_ids=spec.prompt_token_ids,
        target=spec.target_text,
        target_token_ids=spec.target_token_ids,
        foil=spec.foil,
        methods=methods_for(side.method),
        granularity=granularity_enum(granularity),
        custom_regex=side.regex if granularity == "CUSTOM_REGEX" else "",
        target_mask=target_mask,
    )


def all_segments_request(request: saliency_pb2.SaliencyRequest) -> saliency_pb2.SaliencyAllSegmentsRequest:
    """The SaliencyAllSegments request matching a (whole-target) SaliencyRequest."""
    return client_requests.all_segments_request(
        problem=request.problem,
        # a precompute: the server computes clicks (of every user) first and resumes it afterwards
        priority=saliency_pb2.PRIORITY_BACKGROUND,
        tokens_once=True,  # the Prefetcher keeps them from the first message (WholeMessages)
    )


def request_key(request: saliency_pb2.SaliencyRequest | saliency_pb2.SaliencyAllSegmentsRequest) -> str:
    """Content key of a request (for the session cache and the prefetch registry)."""
    digest = hashlib.sha256(type(request).__name__.encode())
    digest.update(request.SerializeToString(deterministic=True))
    return digest.hexdigest()[:24]


def call_saliency(
    endpoints: Endpoints, request: saliency_pb2.SaliencyRequest, request_id: str | None = None
) -> saliency_pb2.SaliencyResponse:
    """One Saliency call (typed :mod:`seqsal.errors` on failure)."""
    return guard(
        "saliency", endpoints, lambda: POOL.saliency(endpoints).saliency(request, request_id=request_id)
    )


class ResponseCache:
    """A small per-session LRU of saliency responses, so display-only changes never call the server."""

    def __init__(self, max_entries: int = 24) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, saliency_pb2.SaliencyResponse] = OrderedDict()

    def get(self, key: str) -> saliency_pb2.SaliencyResponse | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, response: saliency_pb2.SaliencyResponse) -> None:
        self._items[key] = response
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
