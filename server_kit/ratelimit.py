"""The per-caller rate limit of a shared server (requests held at once: :mod:`server_kit.admission`)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimited(Exception):
    """A caller used up its rate; ``retry_after_s`` says when one more request will be allowed."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class RateLimiter:
    """One token bucket per caller: ``per_minute`` requests at once, refilled at ``per_minute`` a minute.

    So a caller may make ``per_minute`` requests in a burst, then one every
    ``60 / per_minute`` seconds. Buckets of callers not seen for a while are
    dropped beyond ``max_callers`` (least recently used first), so many
    distinct callers cannot grow memory without bound.

    Args:
        per_minute: bucket size and refill rate per minute (> 0).
        max_callers: buckets kept at most.
        clock: monotonic clock, replaceable in tests.
    """

    def __init__(
        self, per_minute: int, *, max_callers: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.max_callers = max_callers
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, caller: str) -> None:
        """Take one request from ``caller``'s bucket, or raise :class:`RateLimited`."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(caller, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[caller] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise RateLimited(
                    f"rate limit reached: {self.per_minute} requests per minute for this caller; "
                    f"retry in {wait:.1f} s",
                    wait,
                )
            self._buckets[caller] = (tokens - 1.0, now)
            while len(self._buckets) > self.max_callers:
                self._buckets.popitem(last=False)
