"""Bounded admission: a fixed number of workers and a bounded waiting line.

A request beyond ``max_concurrency`` running plus ``max_queue`` waiting is
refused at once with RESOURCE_EXHAUSTED instead of piling up; a waiting
request whose client goes away leaves the line without running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from seqsal.errors import ResourceExhaustedError


class Admission:
    """Admission control for one server process (asyncio)."""

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._slots = asyncio.Semaphore(max_concurrency)
        self.running = 0
        self.waiting = 0

    @property
    def depth(self) -> int:
        """Requests running or waiting."""
        return self.running + self.waiting

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a worker slot for the body; raises ResourceExhaustedError when the line is full."""
        if self.depth >= self.max_concurrency + self.max_queue:
            raise ResourceExhaustedError(
                f"server busy: {self.running} running and {self.waiting} waiting "
                f"(max_concurrency={self.max_concurrency}, max_queue={self.max_queue}); "
                "retry with backoff, or raise SEQSAL_MAX_QUEUE on the server"
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()
