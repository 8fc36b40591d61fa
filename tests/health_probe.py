"""A gRPC health probe that runs in its own thread beside a test, like a load balancer would.

``async with HealthProbe(address) as probe:`` checks ``grpc.health.v1.Health/Check`` every
``interval_s`` on its own channel until the block ends; each check has a generous deadline
(a check that does not answer within it is recorded as a failure, which is what a server
frozen by one request looks like). The waits run in a worker thread, so the event loop
(which may run an in-process server) stays free. After the block, ``probe.answers`` counts
SERVING answers and ``probe.failures`` lists every other outcome.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class HealthProbe:
    """Checks a server's health from a thread until stopped; see the module docstring."""

    def __init__(self, address: str, *, interval_s: float = 0.05, deadline_s: float = 30.0) -> None:
        self.address = address
        self.interval_s = interval_s
        self.deadline_s = deadline_s
        self.answers = 0
        self.failures: list[str] = []
        self._answered = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    async def __aenter__(self) -> HealthProbe:
        self._thread.start()
        await asyncio.to_thread(self.wait_for_answers, 1)  # never block the loop: it may run the server
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc is None:  # still answering after what the block did
                await asyncio.to_thread(self.wait_for_answers, self.answers + 1)
        finally:
            self._stop.set()
            await asyncio.to_thread(self._thread.join, self.deadline_s + 5)

    def wait_for_answers(self, n: int) -> None:
        """Block until ``n`` checks were answered SERVING; AssertionError if a check failed first."""
        with self._answered:
            ok = self._answered.wait_for(
                lambda: self.answers >= n or bool(self.failures) or not self._thread.is_alive(),
                timeout=self.deadline_s + 5,
            )
        assert not self.failures, f"health checks failed: {self.failures[:5]}"
        assert ok and self.answers >= n, f"only {self.answers} health answers, expected {n}"

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set():
                try:
                    response = stub.Check(health_pb2.HealthCheckRequest(), timeout=self.deadline_s)
                    outcome = (
                        None if response.status == health_pb2.HealthCheckResponse.SERVING else str(response)
                    )
                except grpc.RpcError as exc:
                    outcome = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
                with self._answered:
                    if outcome is None:
                        self.answers += 1
                    else:
                        self.failures.append(outcome)
                    self._answered.notify_all()
                self._stop.wait(self.interval_s)
