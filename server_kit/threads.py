"""Run blocking model work in a worker thread and consume its results as an async stream.

Both servers compute on PyTorch in worker threads while their gRPC front end is asyncio; this is
the one bridge between the two. The producer gets ``emit`` (hand one item to the event loop) and
``stopped`` (true once the consumer has gone away: the client cancelled or its deadline passed),
and should check ``stopped`` at its checkpoints.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


async def stream_from_thread(
    produce: Callable[[Callable[[T], None], Callable[[], bool]], None], executor: Executor | None = None
) -> AsyncIterator[T]:
    """Yield what ``produce(emit, stopped)`` emits in a worker thread; re-raise what it raises.

    When the consumer stops early, ``stopped()`` turns true and this waits (shielded) for the
    worker to return, so whoever bounds concurrency keeps its slot until the model is free again.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    stop = threading.Event()

    def emit(item: T) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            produce(emit, stop.is_set)
        except BaseException as exc:  # handed to the event loop, raised there
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    worker = loop.run_in_executor(executor, work)
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        if not worker.done():
            await asyncio.shield(worker)
