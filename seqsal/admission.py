"""Bounded admission: a fixed number of places, refused at once when they are all taken.

A server holds at most ``max_concurrency + max_queue`` requests (computing, paused or
waiting); one beyond that is refused at once with RESOURCE_EXHAUSTED instead of piling up.
Which admitted request computes when is the scheduler's business
(:mod:`saliency_server.scheduler`); ``running`` is what it reports.
"""

from __future__ import annotations

from collections.abc import Callable

from seqsal.errors import ResourceExhaustedError


class Admission:
    """Admission control for one server process (used from the event loop)."""

    def __init__(
        self, max_concurrency: int, max_queue: int, running: Callable[[], int] | None = None
    ) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.depth = 0  # requests holding a place
        self._running = running

    @property
    def running(self) -> int:
        """Requests computing now (as the scheduler says; 0 without one)."""
        return min(self.depth, self._running()) if self._running is not None else 0

    @property
    def waiting(self) -> int:
        return self.depth - self.running

    def acquire(self) -> None:
        """Take a place; raises ResourceExhaustedError when none is left. Pair with :meth:`release`."""
        if self.depth >= self.max_concurrency + self.max_queue:
            raise ResourceExhaustedError(
                f"server busy: {self.running} running and {self.waiting} waiting "
                f"(max_concurrency={self.max_concurrency}, max_queue={self.max_queue}); "
                "retry with backoff, or raise SEQSAL_MAX_QUEUE on the server"
            )
        self.depth += 1

    def release(self) -> None:
        self.depth -= 1
