"""Generation for the workbench: a side's GenerateRequest, streamed, and the recent results every
session shares (generation is greedy or seeded, so a link opened by a teammate needs no new call).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from seqsal.request_ids import new_request_id
from seqsal.v1 import inference_pb2
from ui.clients import POOL, Endpoints, TargetProblem, guard
from ui.state import SideState


@dataclass(frozen=True)
class CandidateText:
    """One generated candidate."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    #: How many of ``token_ids`` ``text`` comes from (the rest completed a stop string).
    text_token_count: int = -1

    @property
    def shown_token_ids(self) -> tuple[int, ...]:
        """The ids of what the response box shows: without those that only completed a stop string."""
        if self.text_token_count < 0 or (self.text_token_count == 0 and self.text):
            return self.token_ids  # not reported
        return self.token_ids[: self.text_token_count]


@dataclass(frozen=True)
class Generation:
    """A generation result: the exact prompt the model saw and its candidates."""

    key: str
    prompt: str
    prompt_token_ids: tuple[int, ...]
    model: str
    candidates: tuple[CandidateText, ...]
    elapsed_s: float
    #: the ``x-request-id`` of the Generate call; the saliency calls explaining this generation
    #: carry it too, so one user action can be followed through both services' logs
    request_id: str = ""
    #: True when this is a recent identical request's result from the shared cache, not a new call
    reused: bool = False


def generate_request(side: SideState) -> inference_pb2.GenerateRequest:
    """The GenerateRequest of a side (greedy unless a temperature is set; seeded for links)."""
    request = inference_pb2.GenerateRequest(
        model=side.model,
        prompt=side.prompt,
        n=side.n,
        max_tokens=side.max_new_tokens,
        temperature=side.temperature,
        stop=list(side.stop),
        use_chat_template=side.chat_template,
    )
    if side.temperature > 0:
        request.seed = side.seed
    return request


class GenerationCache:
    """Recent generations shared by every session (a link opened by a teammate needs no new call).

    Generation is deterministic here (greedy, or seeded sampling), so a request's result can be
    reused; the Generate button asks the server again.
    """

    def __init__(self, max_entries: int = 64) -> None:
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str], Generation] = OrderedDict()
        self.max_entries = max_entries

    def get(self, endpoints: Endpoints, key: str) -> Generation | None:
        with self._lock:
            item = self._items.get((endpoints.inference, key))
            if item is not None:
                self._items.move_to_end((endpoints.inference, key))
            return item

    def put(self, endpoints: Endpoints, generation: Generation) -> None:
        with self._lock:
            self._items[(endpoints.inference, generation.key)] = generation
            self._items.move_to_end((endpoints.inference, generation.key))
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)


GENERATIONS = GenerationCache()


def generate(
    endpoints: Endpoints,
    side: SideState,
    on_update: Callable[[dict[int, str]], None] | None = None,
    *,
    reuse: bool = True,
) -> Generation:
    """Generate the side's candidates, streaming: ``on_update`` gets the texts so far.

    With ``reuse``, a recent identical request (from any session) is answered from memory.
    """
    if not side.prompt.strip():
        raise TargetProblem("The prompt is empty: type a prompt or pick an example.")
    if reuse and (known := GENERATIONS.get(endpoints, side.generation_key())) is not None:
        return replace(known, reused=True)
    client = POOL.inference(endpoints)
    request_id = new_request_id()
    started = time.monotonic()
    texts: dict[int, list[str]] = {}
    ids: dict[int, list[int]] = {}
    finish: dict[int, int] = {}
    counts: dict[int, int] = {}
    head: inference_pb2.GenerateStreamResponse | None = None

    def run() -> None:
        nonlocal head
        last_update = 0.0
        for piece in client.generate_stream(generate_request(side), request_id=request_id):
            if head is None:
                head = piece
            texts.setdefault(piece.index, []).append(piece.text)
            ids.setdefault(piece.index, []).extend(piece.token_ids)
            if piece.finish_reason:
                finish[piece.index] = piece.finish_reason
                counts[piece.index] = piece.text_token_count
            now = time.monotonic()
            if on_update is not None and now - last_update > 0.15:
                last_update = now
                on_update({i: "".join(t) for i, t in texts.items()})

    guard("inference", endpoints, run)
    if head is None:
        raise TargetProblem("The inference server returned no candidates; try again.")
    candidates = tuple(
        CandidateText(
            index=i,
            text="".join(texts[i]),
            token_ids=tuple(ids[i]),
            finish_reason=inference_pb2.FinishReason.Name(finish.get(i, 0)),  # type: ignore[arg-type]
            text_token_count=counts.get(i, -1),
        )
        for i in sorted(texts)
    )
    generation = Generation(
        key=side.generation_key(),
        prompt=head.prompt,
        prompt_token_ids=tuple(head.prompt_token_ids),
        model=head.model,
        candidates=candidates,
        elapsed_s=time.monotonic() - started,
        request_id=request_id,
    )
    GENERATIONS.put(endpoints, generation)
    return generation
