"""Bounded admission, the one concurrency limiter of both servers: a fixed number of places,
refused at once when they are all taken.

The saliency server holds at most ``max_concurrency + max_queue`` requests (computing, paused or
waiting); which admitted request computes when is the scheduler's business
(:mod:`saliency_server.scheduler`), and ``running`` is what it reports. The inference server holds
at most ``SEQSAL_INFERENCE_MAX_CONCURRENCY`` generation calls in flight (the backend batches them). A
request beyond the bound is refused at once with RESOURCE_EXHAUSTED naming the setting that raises
it, instead of piling up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from seqsal.errors import ResourceExhaustedError


class Admission:
    """Admission control for one server process (used from the event loop).

    Args:
        places: requests held at most.
        setting: what raises the bound, named in the refusal (e.g. ``SEQSAL_MAX_QUEUE``).
        running: how many of the held requests compute now (the scheduler's count); None = all.
        bound: how the refusal describes the bound (default: ``limit <places>``).
    """

    def __init__(
        self,
        places: int,
        setting: str,
        *,
        running: Callable[[], int] | None = None,
        bound: str | None = None,
    ) -> None:
        self.places = places
        self.setting = setting
        self.bound = bound or f"limit {places}"
        self.depth = 0  # requests holding a place
        self._running = running

    @property
    def running(self) -> int:
        """Requests computing now (as the scheduler says; every holder without one)."""
        return min(self.depth, self._running()) if self._running is not None else self.depth

    @property
    def waiting(self) -> int:
        return self.depth - self.running

    def acquire(self) -> None:
        """Take a place; raises ResourceExhaustedError when none is left. Pair with :meth:`release`."""
        if self.depth >= self.places:
            raise ResourceExhaustedError(
                f"server busy: {self.running} running and {self.waiting} waiting ({self.bound}); "
                f"retry with backoff, or raise {self.setting} on the server"
            )
        self.depth += 1

    def release(self) -> None:
        self.depth -= 1

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold a place for the body; raises ResourceExhaustedError when none is left."""
        self.acquire()
        try:
            yield
        finally:
            self.release()
