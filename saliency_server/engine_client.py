"""The seam between the serving layer and an engine: compute, health, errored.

Serving talks to every model through :class:`SaliencyEngine`, never to the model or its
validated request directly, so an engine can be swapped (another backend, a remote one, a
fake in tests) without touching the serving code.

:class:`ModelEngine` is the one implementation: it wraps a
:class:`~saliency_server.engine.GradientEngine` and tells a broken engine from a bad
request. After an unexpected error (not a typed :class:`~seqsal.errors.SeqsalError`, e.g. a
``RuntimeError`` from a CUDA kernel) it probes the model with a two-token forward pass: if
the probe fails too, the engine is *errored* (health NOT_SERVING: restart the replica); if it
works, only that request failed (INTERNAL) and the engine stays healthy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

import numpy as np

from saliency_server.engine import CancelCheck, GradientEngine, SaliencyInputs, SaliencyResult, Steps
from seqsal.errors import InternalError, SeqsalError, UnavailableError

logger = logging.getLogger("seqsal.engine")

T = TypeVar("T")


class SaliencyEngine(Protocol):
    """What serving needs from one model's engine."""

    def compute(
        self,
        inputs: SaliencyInputs,
        masks: np.ndarray,
        methods: Sequence[int],
        *,
        ig_steps: int,
        cancelled: CancelCheck | None = None,
        steps: Steps | None = None,
    ) -> Iterator[SaliencyResult]:
        """Results for the selections ``masks`` (see ``GradientEngine.saliency_batch``)."""
        ...

    def compute_many(
        self,
        items: Sequence[tuple[SaliencyInputs, Sequence[bool]]],
        methods: Sequence[int],
        *,
        cancelled: CancelCheck | None = None,
        steps: Steps | None = None,
    ) -> Iterator[SaliencyResult]:
        """One selection of each of several problems as one batch (``GradientEngine.saliency_many``)."""
        ...

    def score_rows(
        self,
        rows: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        batch_tokens: int,
        cancelled: CancelCheck | None = None,
        steps: Steps | None = None,
    ) -> list[np.ndarray]:
        """Log-probs of each row's target after its prompt (``GradientEngine.score_rows``)."""
        ...

    def health(self) -> bool:
        """Whether the engine works (a cheap probe); False once it is errored."""
        ...

    @property
    def errored(self) -> str | None:
        """Why the engine is broken, or None while it works."""
        ...


class ModelEngine:
    """:class:`SaliencyEngine` over a :class:`GradientEngine`.

    Args:
        engine: the gradient engine of one loaded model.
        on_errored: called once (from the worker thread) when the engine breaks.
    """

    def __init__(self, engine: GradientEngine, on_errored: Callable[[str], None] | None = None) -> None:
        self.gradient = engine
        self.on_errored = on_errored
        self._errored: str | None = None

    @property
    def errored(self) -> str | None:
        return self._errored

    def health(self) -> bool:
        if self._errored is not None:
            return False
        try:
            self.gradient.probe()
        except Exception as exc:  # any failure of the probe means broken
            self._mark_errored(f"{type(exc).__name__}: {exc}")
            return False
        return True

    def _mark_errored(self, why: str) -> None:
        if self._errored is None:
            self._errored = why
            logger.error("engine broken, health NOT_SERVING: %s", why)
            if self.on_errored is not None:
                self.on_errored(why)

    def compute(
        self,
        inputs: SaliencyInputs,
        masks: np.ndarray,
        methods: Sequence[int],
        *,
        ig_steps: int,
        cancelled: CancelCheck | None = None,
        steps: Steps | None = None,
    ) -> Iterator[SaliencyResult]:
        return self._guarded(
            lambda: self.gradient.saliency_batch(
                inputs, masks, methods, ig_steps=ig_steps, cancelled=cancelled, steps=steps
            )
        )

    def compute_many(
        self,
        items: Sequence[tuple[SaliencyInputs, Sequence[bool]]],
        methods: Sequence[int],
        *,
        cancelled: CancelCheck | None = None,
        steps: Steps | None = None,
    ) -> Iterator[SaliencyResult]:
        return self._guarded(
            lambda: self.gradient.saliency_many(items, methods, cancelled=cancelled, steps=steps)
        )

    def score_rows(
        self,
        rows: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        batch_tokens: int,
        cancelled: CancelCheck | None = None,
        steps: Steps | None = None,
    ) -> list[np.ndarray]:
        scores = self._guarded(
            lambda: iter(
                [self.gradient.score_rows(rows, batch_tokens=batch_tokens, cancelled=cancelled, steps=steps)]
            )
        )
        return next(scores)

    def _guarded(self, run: Callable[[], Iterator[T]]) -> Iterator[T]:
        """``run()``'s results; an unexpected error is INTERNAL, or UNAVAILABLE if the engine broke."""
        if self._errored is not None:
            raise UnavailableError(
                f"this server's engine is broken ({self._errored}); retry on another replica"
            )
        try:
            yield from run()
        except SeqsalError:
            raise
        except Exception as exc:
            logger.exception("saliency computation failed")
            if not self.health():
                raise UnavailableError(
                    f"the engine broke ({type(exc).__name__}: {exc}); retry on another replica"
                ) from exc
            raise InternalError(f"saliency computation failed: {type(exc).__name__}: {exc}") from exc
