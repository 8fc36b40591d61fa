"""Where the two services are, one client pool for every session, and their errors in plain words.

Everything the workbench asks a server goes through :mod:`seqsal.client` with a client from
:data:`POOL`; the UI never loads a model. :func:`guard` drops a client after UNAVAILABLE so the
next try reconnects at once; :func:`describe_error` says what went wrong and what to do.
Nothing here draws anything, so it is usable (and tested) without a Streamlit page.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from seqsal import errors
from seqsal.client import InferenceClient, SaliencyClient
from seqsal.retry import RetryPolicy
from seqsal.v1 import common_pb2
from ui.settings import UISettings

Service = Literal["saliency", "inference"]

#: Deadlines (seconds). Generation and saliency on a CPU can take a while on long prompts.
LIST_MODELS_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 600.0

#: Retries on UNAVAILABLE (seqsal.retry): few and short, so that a service that is down is
#: reported within a second; the page then reconnects by itself (ui/outage.py).
UI_RETRY = RetryPolicy(attempts=3, initial_backoff_s=0.1, max_backoff_s=0.4)


@dataclass(frozen=True)
class Endpoints:
    """Where the two services are (from :class:`seqsal.settings.UISettings`)."""

    saliency: str
    inference: str
    max_message_mb: int = 64

    @classmethod
    def from_settings(cls, settings: UISettings) -> Endpoints:
        return cls(settings.saliency_address, settings.inference_address, settings.max_message_mb)

    def address(self, service: Service) -> str:
        return self.saliency if service == "saliency" else self.inference


def load_settings() -> UISettings:
    """The settings for this run: ``SEQSAL_*`` environment variables, ``.env``, defaults."""
    return UISettings()


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


def guard(service: Service, endpoints: Endpoints, call: Callable[[], T]) -> T:
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
            response = guard(
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
