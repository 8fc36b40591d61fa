"""The UI's application layer: what the workbench does with the two gRPC services, minus the drawing.

Clients from the settings (one pool), the calls (models, generation, saliency) with their caches,
the background prefetch of every segment, and errors described in plain words. Everything here
goes through :mod:`seqsal.client`; the UI never loads a model. Nothing in this module draws
anything, so it is usable (and tested) without a Streamlit page; :mod:`ui.explain` runs one
side's loop over it and :mod:`ui.views` draws the result.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

import grpc

from seqsal import client as client_requests
from seqsal import errors
from seqsal.client import InferenceClient, SaliencyClient, WholeMessages, error_from_rpc
from seqsal.request_ids import REQUEST_ID_KEY, new_request_id
from seqsal.retry import RetryPolicy
from seqsal.settings import Settings
from seqsal.v1 import common_pb2, inference_pb2, saliency_pb2
from ui.state import PERTURBATION_METHODS, SideState, granularity_enum, method_enum

Service = Literal["saliency", "inference"]

#: Deadlines (seconds). Generation and saliency on a CPU can take a while on long prompts.
LIST_MODELS_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 600.0

#: Retries on UNAVAILABLE (seqsal.retry): few and short, so that a service that is down is
#: reported within a second; the page then reconnects by itself (ui/outage.py).
UI_RETRY = RetryPolicy(attempts=3, initial_backoff_s=0.1, max_backoff_s=0.4)

#: Prefetch all segments with integrated gradients only up to this many target segments.
MAX_IG_PREFETCH_SEGMENTS = 16


@dataclass(frozen=True)
class Endpoints:
    """Where the two services are (from :class:`seqsal.settings.Settings`)."""

    saliency: str
    inference: str
    max_message_mb: int = 64

    @classmethod
    def from_settings(cls, settings: Settings) -> Endpoints:
        return cls(settings.saliency_address, settings.inference_address, settings.max_message_mb)

    def address(self, service: Service) -> str:
        return self.saliency if service == "saliency" else self.inference


def load_settings() -> Settings:
    """The settings for this run: ``SEQSAL_*`` environment variables, ``.env``, defaults."""
    return Settings()


# --------------------------------------------------------------------------- errors in plain words


_ENV_NAME: dict[Service, str] = {
    "saliency": "SEQSAL_SALIENCY_ADDRESS",
    "inference": "SEQSAL_INFERENCE_ADDRESS",
}


def describe_error(exc: BaseException, service: Service, address: str) -> str:
    """What went wrong, in plain words, and what to do about it (Markdown)."""
    name = f"{service} server"
    if isinstance(exc, errors.UnavailableError):
        return (
            f"The {name} at `{address}` is not reachable; it may be restarting (`seqsal up` "
            "restarts a server that stops). Once it answers, this page reconnects by itself; if "
            f"nothing should run there, point `{_ENV_NAME[service]}` at a running server."
        )
    if isinstance(exc, errors.DeadlineExceededError):
        return (
            f"The {name} at `{address}` took too long to answer. Try a shorter prompt, fewer new "
            "tokens or a coarser granularity, or wait until it is less busy."
        )
    if isinstance(exc, errors.ResourceExhaustedError):
        return f"The {name} is busy (its queue is full). Wait a few seconds and try again."
    if isinstance(exc, errors.NotFoundError):
        return f"The {name} does not host that model: {exc.message}. Pick one from the model list."
    if isinstance(exc, errors.CancelledError):
        return f"The request to the {name} was cancelled. Try again."
    if isinstance(exc, errors.InvalidArgumentError):
        advice = {
            "custom_regex": "Fix the custom regex.",
            "use_chat_template": "Turn off **Chat template** for this model.",
            "prompt": "Shorten or fix the prompt.",
            "target": "Fix the target text.",
            "foil": "Fix the foil text.",
            "max_tokens": "Lower **Max new tokens**.",
            "n": "Ask for fewer candidates.",
        }.get(exc.field or "", "")
        return f"The {name} could not use this request: {exc.message}" + (f" {advice}" if advice else "")
    if isinstance(exc, errors.FailedPreconditionError):
        return f"The {name} is not ready: {exc.message}. Wait a moment and try again."
    if isinstance(exc, errors.SeqsalError):
        return (
            f"The {name} failed: {exc.message}. The page keeps working; if this repeats, check the "
            "server's log (with `seqsal up`: `logs/`)."
        )
    return f"Unexpected problem talking to the {name} at `{address}`: {exc}"


class TargetProblem(ValueError):
    """The view cannot be explained as it stands (no response yet, empty reference...): plain words."""


# --------------------------------------------------------------------------- clients


class ClientPool:
    """One client per (service, address, deadline), shared by every session; dropped after UNAVAILABLE.

    gRPC channels back off after a failed connection (up to minutes); a fresh channel makes a
    server that has just come up usable at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[tuple[Service, str, int, float], SaliencyClient | InferenceClient] = {}

    def _get(
        self, service: Service, endpoints: Endpoints, timeout: float
    ) -> SaliencyClient | InferenceClient:
        key = (service, endpoints.address(service), endpoints.max_message_mb, timeout)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                cls = SaliencyClient if service == "saliency" else InferenceClient
                client = cls(key[1], timeout=timeout, max_message_mb=endpoints.max_message_mb, retry=UI_RETRY)
                self._clients[key] = client
            return client

    def saliency(self, endpoints: Endpoints, timeout: float = CALL_TIMEOUT_S) -> SaliencyClient:
        client = self._get("saliency", endpoints, timeout)
        assert isinstance(client, SaliencyClient)
        return client

    def inference(self, endpoints: Endpoints, timeout: float = CALL_TIMEOUT_S) -> InferenceClient:
        client = self._get("inference", endpoints, timeout)
        assert isinstance(client, InferenceClient)
        return client

    def reset(self, service: Service, address: str) -> None:
        """Forget the clients of one address (their channels are closed)."""
        with self._lock:
            stale = [k for k in self._clients if k[0] == service and k[1] == address]
            for key in stale:
                self._clients.pop(key).close()


POOL = ClientPool()

T = TypeVar("T")


def _guard(service: Service, endpoints: Endpoints, call: Callable[[], T]) -> T:
    """Run ``call``; on UNAVAILABLE drop the cached client so the next try reconnects at once."""
    try:
        return call()
    except errors.UnavailableError:
        POOL.reset(service, endpoints.address(service))
        raise


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelsReport:
    """The models both services host, and what went wrong asking them."""

    #: Ids usable for generation and saliency (hosted by both), default first.
    ids: tuple[str, ...]
    infos: dict[str, common_pb2.ModelInfo]
    #: Service -> plain-words problem, for services that answered with an error.
    problems: dict[str, str] = field(default_factory=dict)
    #: Service -> address, for services that did not answer at all (ui/outage.py says so).
    down: dict[str, str] = field(default_factory=dict)

    @property
    def default(self) -> str:
        return self.ids[0] if self.ids else ""


def list_models(endpoints: Endpoints) -> ModelsReport:
    """ListModels on both services; a service that fails is reported, not raised."""
    answers: dict[str, list[common_pb2.ModelInfo]] = {}
    problems: dict[str, str] = {}
    down: dict[str, str] = {}
    for service in ("inference", "saliency"):
        get = POOL.inference if service == "inference" else POOL.saliency
        try:
            response = _guard(
                service, endpoints, lambda get=get: get(endpoints, LIST_MODELS_TIMEOUT_S).list_models()
            )
            answers[service] = list(response.models)
        except errors.UnavailableError:
            down[service] = endpoints.address(service)
        except errors.SeqsalError as exc:
            problems[service] = describe_error(exc, service, endpoints.address(service))
    if "inference" in answers and "saliency" in answers:
        on_saliency = {m.id for m in answers["saliency"]}
        models = [m for m in answers["inference"] if m.id in on_saliency]
        if not models:
            problems["models"] = (
                "The inference and saliency servers host no model with the same id "
                f"(inference: {', '.join(m.id for m in answers['inference'])}; "
                f"saliency: {', '.join(sorted(on_saliency))}). Start both with the same `--model`."
            )
    else:
        models = answers.get("inference") or answers.get("saliency") or []
    return ModelsReport(
        ids=tuple(m.id for m in models), infos={m.id: m for m in models}, problems=problems, down=down
    )


# --------------------------------------------------------------------------- generation


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

    _guard("inference", endpoints, run)
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


# --------------------------------------------------------------------------- saliency


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
    return _guard(
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


# --------------------------------------------------------------------------- background prefetch


@dataclass
class Progress:
    """Progress of one SaliencyAllSegments prefetch (a snapshot; the live one is guarded by a lock)."""

    key: str
    total: int | None = None
    done: int = 0
    #: Target segment indices whose saliency is in the server's cache now.
    done_indices: frozenset[int] = frozenset()
    error: str | None = None
    finished: bool = False
    cancelled: bool = False
    #: the stream's x-request-id (ask the server where it stands: ui/queue_status.py)
    request_id: str = ""
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None

    @property
    def elapsed_s(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started_at


class _Job:
    def __init__(self, key: str, endpoints: Endpoints) -> None:
        self.progress = Progress(key=key, request_id=new_request_id())
        self.endpoints = endpoints
        self.call: grpc.Future | None = None
        self.cancel_requested = False
        self.thread: threading.Thread | None = None


class Prefetcher:
    """Runs ``SaliencyAllSegments`` (background priority) in background threads.

    The server schedules: a click goes before any precompute, this one's or another user's, so
    nothing here pauses. What the stream returns is kept (a bounded LRU of responses, by job and
    segment): :meth:`response` answers a click on a finished segment without a call.

    Jobs are keyed by request content (two sessions asking the same thing share one job) and
    owned by ``(session, side)`` slots: starting a new job for a slot cancels the slot's previous
    job unless another slot still wants it. :meth:`progress` is safe from any thread.
    """

    def __init__(self, max_jobs: int = 64, max_responses: int = 512) -> None:
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._owners: dict[str, str] = {}
        self._requests: dict[str, tuple[Endpoints, saliency_pb2.SaliencyAllSegmentsRequest]] = {}
        self._responses: OrderedDict[tuple[str, int], saliency_pb2.SaliencyResponse] = OrderedDict()
        self.max_jobs = max_jobs
        self.max_responses = max_responses

    def response(self, key: str, segment_index: int) -> saliency_pb2.SaliencyResponse | None:
        """The response the stream of job ``key`` returned for a target segment, if it has."""
        with self._lock:
            item = self._responses.get((key, segment_index))
            if item is not None:
                self._responses.move_to_end((key, segment_index))
            return item

    def _keep(self, key: str, message: saliency_pb2.SaliencyAllSegmentsResponse) -> None:
        with self._lock:
            self._responses[(key, message.segment_index)] = message.saliency
            self._responses.move_to_end((key, message.segment_index))
            while len(self._responses) > self.max_responses:
                self._responses.popitem(last=False)

    def start(
        self, owner: str, endpoints: Endpoints, request: saliency_pb2.SaliencyAllSegmentsRequest
    ) -> str:
        """Start (or join) the prefetch of ``request`` for ``owner``; returns the job key."""
        key = request_key(request)
        with self._lock:
            previous = self._owners.get(owner)
            self._owners[owner] = key
            self._requests[owner] = (endpoints, request)
            if previous and previous != key and previous not in self._owners.values():
                old = self._jobs.get(previous)
                if old is not None and not old.progress.finished:
                    old.cancel_requested = True
                    if old.call is not None:
                        old.call.cancel()
            job = self._jobs.get(key)
            dead = job is None or job.cancel_requested or job.progress.error or job.progress.cancelled
            if not dead:
                assert job is not None
                self._jobs.move_to_end(key)
                return key
            job = _Job(key, endpoints)
            self._jobs[key] = job
            self._trim()
        job.thread = threading.Thread(
            target=self._run, args=(job, endpoints, request), name=f"seqsal-prefetch-{key[:8]}", daemon=True
        )
        job.thread.start()
        return key

    def _trim(self) -> None:
        while len(self._jobs) > self.max_jobs:
            for key, job in self._jobs.items():
                if job.progress.finished:
                    del self._jobs[key]
                    break
            else:
                return

    def _run(self, job: _Job, endpoints: Endpoints, request: saliency_pb2.SaliencyAllSegmentsRequest) -> None:
        client = POOL.saliency(endpoints)
        try:
            metadata = (*client.metadata, (REQUEST_ID_KEY, job.progress.request_id))
            call = client.stub.SaliencyAllSegments(request, timeout=CALL_TIMEOUT_S, metadata=metadata)
            with self._lock:
                job.call = call
                if job.cancel_requested:
                    call.cancel()
            whole = WholeMessages()
            for message in call:
                self._keep(job.progress.key, whole(message))
                with self._lock:
                    job.progress.total = message.segment_count
                    job.progress.done += 1
                    job.progress.done_indices = job.progress.done_indices | {message.segment_index}
        except grpc.RpcError as exc:
            error = error_from_rpc(exc)
            with self._lock:
                if job.cancel_requested or isinstance(error, errors.CancelledError):
                    job.progress.cancelled = True
                else:
                    job.progress.error = describe_error(error, "saliency", endpoints.saliency)
            if isinstance(error, errors.UnavailableError):
                POOL.reset("saliency", endpoints.saliency)
        except Exception as exc:  # a bug must not kill the thread silently
            with self._lock:
                job.progress.error = f"Prefetch failed: {exc}"
        finally:
            with self._lock:
                if job.progress.total is None and not job.progress.error and not job.progress.cancelled:
                    job.progress.total = job.progress.done
                job.progress.finished = True
                job.progress.finished_at = time.monotonic()

    def progress(self, key: str) -> Progress | None:
        """A copy of a job's progress (``None`` for an unknown key)."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                return None
            p = job.progress
            return Progress(
                key=p.key,
                total=p.total,
                done=p.done,
                done_indices=p.done_indices,
                error=p.error,
                finished=p.finished,
                cancelled=p.cancelled,
                request_id=p.request_id,
                started_at=p.started_at,
                finished_at=p.finished_at,
            )

    def endpoints(self, key: str) -> Endpoints | None:
        """Where job ``key`` runs."""
        with self._lock:
            job = self._jobs.get(key)
            return None if job is None else job.endpoints

    def cancel(self, key: str) -> bool:
        """Cancel a running job (e.g. to let a click through first); True if it was running."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.progress.finished or job.cancel_requested:
                return False
            job.cancel_requested = True
            if job.call is not None:
                job.call.cancel()
            return True

    def sweep(self, alive: Callable[[str], bool]) -> list[str]:
        """Forget owners that are gone (``alive(owner)`` is false) and cancel the jobs only they wanted."""
        with self._lock:
            gone = [owner for owner in self._owners if not alive(owner)]
            for owner in gone:
                del self._owners[owner]
                self._requests.pop(owner, None)
            wanted = set(self._owners.values())
            stale = [k for k, job in self._jobs.items() if k not in wanted and not job.progress.finished]
        for key in stale:
            self.cancel(key)
        return gone

    def wait(self, key: str, timeout: float) -> Progress | None:
        """Block until a job finishes (for tests and scripts); returns its progress."""
        with self._lock:
            job = self._jobs.get(key)
        if job is not None and job.thread is not None:
            job.thread.join(timeout)
        return self.progress(key)


PREFETCHER = Prefetcher()
