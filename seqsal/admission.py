"""Bounded admission: a fixed number of workers and a bounded waiting line.

A request beyond ``max_concurrency`` running plus ``max_queue`` waiting is
refused at once with RESOURCE_EXHAUSTED instead of piling up; a waiting
request whose client goes away leaves the line without running. With a memory
budget, a request also waits until its estimated bytes fit beside the running
ones' (one always runs alone, so a request the budget admits never waits forever).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from seqsal.errors import ResourceExhaustedError


class Admission:
    """Admission control for one server process (asyncio)."""

    def __init__(self, max_concurrency: int, max_queue: int, budget_bytes: int | None = None) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.budget_bytes = budget_bytes
        self._slots = asyncio.Semaphore(max_concurrency)
        self._memory = asyncio.Condition()
        self.running = 0
        self.waiting = 0
        self.bytes_in_use = 0

    @property
    def depth(self) -> int:
        """Requests running or waiting."""
        return self.running + self.waiting

    @asynccontextmanager
    async def slot(self, cost_bytes: int = 0) -> AsyncIterator[None]:
        """Hold a worker slot (and ``cost_bytes`` of the memory budget) for the body.

        Raises ResourceExhaustedError when the line is full.
        """
        if self.depth >= self.max_concurrency + self.max_queue:
            raise ResourceExhaustedError(
                f"server busy: {self.running} running and {self.waiting} waiting "
                f"(max_concurrency={self.max_concurrency}, max_queue={self.max_queue}); "
                "retry with backoff, or raise SEQSAL_MAX_QUEUE on the server"
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
            try:
                await self._reserve(cost_bytes)
            except BaseException:
                self._slots.release()
                raise
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            await self._release(cost_bytes)
            self._slots.release()

    def _fits(self, cost_bytes: int) -> bool:
        if self.budget_bytes is None or self.bytes_in_use == 0:
            return True
        return self.bytes_in_use + cost_bytes <= self.budget_bytes

    async def _reserve(self, cost_bytes: int) -> None:
        async with self._memory:
            await self._memory.wait_for(lambda: self._fits(cost_bytes))
            self.bytes_in_use += cost_bytes

    async def _release(self, cost_bytes: int) -> None:
        self.bytes_in_use -= cost_bytes  # first, so the books are right even if the wake-up is cancelled
        async with self._memory:
            self._memory.notify_all()
