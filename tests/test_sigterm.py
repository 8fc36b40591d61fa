"""``seqsal serve saliency`` drains on SIGTERM: in-flight calls finish, new ones are refused, exit 0.

The server runs as a real subprocess (``python -m seqsal_cli serve saliency``) with a tiny
model. A long integrated-gradients request keeps it busy; its length is calibrated on this
machine first, so the request is certainly still running when the signal arrives.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seqsal.client import SaliencyClient, all_segments_request
from seqsal.errors import UnavailableError
from seqsal.request_ids import REQUEST_ID_KEY, new_request_id
from seqsal.retry import RetryPolicy
from seqsal.v1 import common_pb2, saliency_pb2

REPO_ROOT = Path(__file__).resolve().parent.parent
GRACE_S = 20.0
LONG_REQUEST_S = 4.0  # how long the in-flight request should take
PROMPT = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. "
    "Every morning he rowed out past the rocks, cast his net, and waited for the tide to turn. "
    "Some days the net came back heavy with silver fish; other days it held nothing but weeds."
)
TARGET = " One morning he caught a golden fish."


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _health(address: str) -> int | None:
    """The server's overall health status, or None if it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return None
        return int(response.status)


@pytest.fixture
def server_process(
    tiny_llama_dir: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """A running ``seqsal serve saliency`` subprocess, its address and its log file."""
    with _server(tiny_llama_dir, tmp_path, GRACE_S) as running:
        yield running


@contextlib.contextmanager
def _server(
    tiny_llama_dir: Path, tmp_path: Path, grace_s: float, metrics_port: int | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    port = _free_port()
    log_path = tmp_path / "server.log"
    env = dict(os.environ)
    env.update(
        {
            "SEQSAL_SHUTDOWN_GRACE_S": str(grace_s),
            **({"SEQSAL_METRICS_PORT": str(metrics_port)} if metrics_port else {}),
            "SEQSAL_MAX_QUEUE": "4",
            # one interpolation point per pass: IG steps get slow enough to outlast the signal
            "SEQSAL_IG_BATCH_SIZE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
            "COLUMNS": "200",
        }
    )
    env.pop("REDIS_URL", None)
    env.pop("SEQSAL_REDIS_URL", None)
    command = [
        sys.executable,
        "-m",
        "seqsal_cli",
        "serve",
        "saliency",
        "--port",
        str(port),
        "--model",
        f"tiny={tiny_llama_dir}",
        "--device",
        "cpu",
    ]
    with log_path.open("wb") as log:
        # cwd: a directory without a .env file, so only the environment above configures it
        process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while _health(address) != health_pb2.HealthCheckResponse.SERVING:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not SERVING after 60 s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield process, address, log_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_sigterm_drains_in_flight_requests_and_exits_cleanly(
    server_process: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    process, address, log_path = server_process
    with SaliencyClient(address, timeout=60.0) as client:
        # calibrate: integrated gradients cost about the same per step; the difference of two
        # probes removes the fixed cost of a call (the first call also warms the server up)
        timings: dict[int, float] = {}
        for probe_steps in (8, 16, 80):
            started = time.perf_counter()
            probe = client.saliency(
                prompt=PROMPT, target=TARGET, methods=[common_pb2.INTEGRATED_GRADIENTS], ig_steps=probe_steps
            )
            timings[probe_steps] = time.perf_counter() - started
            assert probe.scores[0].ig_steps == probe_steps
        per_step = max(timings[80] - timings[16], 1e-6) / 64
        steps = min(1024, max(64, math.ceil(LONG_REQUEST_S / per_step)))

        with ThreadPoolExecutor(max_workers=1) as pool:
            in_flight = pool.submit(
                client.saliency,
                prompt=PROMPT + " Slow.",  # not cached
                target=TARGET,
                methods=[common_pb2.INTEGRATED_GRADIENTS],
                ig_steps=steps,
            )
            time.sleep(min(0.5, steps * per_step / 4))  # let it reach the server
            assert not in_flight.done(), "the long request finished before SIGTERM; the test proves nothing"
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            time.sleep(0.3)

            # draining: a new call on a new connection is refused (asked once: the default policy
            # would retry it for seconds, as it should to reach another replica)
            with (
                SaliencyClient(address, timeout=5.0, retry=RetryPolicy(attempts=1)) as late,
                pytest.raises(UnavailableError),
            ):
                late.saliency(prompt="Too late.", target=TARGET)
            assert process.poll() is None, "the server quit before its in-flight request finished"
            assert not in_flight.done(), "the long request finished too early to show draining"

            # the in-flight call completes normally
            response = in_flight.result(timeout=GRACE_S + 10)
        assert response.scores[0].method == common_pb2.INTEGRATED_GRADIENTS
        assert response.scores[0].ig_steps == steps and not response.cache_hit
        assert any(v != 0.0 for v in response.scores[0].scores)

    returncode = process.wait(timeout=GRACE_S + 10)
    elapsed = time.monotonic() - signalled
    log = log_path.read_text(errors="replace")
    assert returncode == 0, log
    assert elapsed < GRACE_S, f"took {elapsed:.1f} s to exit\n{log}"
    assert "signal received" in log and "draining" in log, log


#: The drain's grace for the precompute tests: short, so they do not wait 20 s for nothing.
PRECOMPUTE_GRACE_S = 6.0
#: After the grace: the worker's next checkpoint, closing the serving layer and the interpreter's exit.
EXIT_MARGIN_S = 8.0
#: Sentences of the precompute's target: each is 1,024 IG passes (~1-2 s on an idle core with the
#: tiny model), so the whole precompute is far longer than the grace, even on a fast machine.
PRECOMPUTE_PARTS = 48


class _Precompute:
    """A SaliencyAllSegments stream at background priority (minutes of IG work), read in a thread."""

    def __init__(self, client: SaliencyClient) -> None:
        self.client = client
        self.request_id = new_request_id()
        request = all_segments_request(
            prompt=PROMPT,
            target=" ".join(f"Part {i}." for i in range(PRECOMPUTE_PARTS)),
            granularity=common_pb2.SENTENCES,
            methods=[common_pb2.INTEGRATED_GRADIENTS],
            ig_steps=1024,  # one interpolation point per pass (SEQSAL_IG_BATCH_SIZE=1)
            priority=saliency_pb2.PRIORITY_BACKGROUND,
        )
        metadata = (*client.metadata, (REQUEST_ID_KEY, self.request_id))
        self.call = client.stub.SaliencyAllSegments(request, timeout=600, metadata=metadata)
        self.messages = 0
        self.code: grpc.StatusCode | None = None
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        try:
            for _ in self.call:
                self.messages += 1
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.code = exc.code()
        self.ended.set()

    def state(self) -> int | None:
        answer = self.client.get_request_status(self.request_id)
        return next((c.state for c in answer.calls if c.rpc == "SaliencyAllSegments"), None)

    def wait_running(self) -> None:
        deadline = time.monotonic() + 60
        while self.state() != saliency_pb2.REQUEST_STATE_RUNNING:  # wait for the state
            assert self.code is None, f"the precompute ended: {self.code}"
            assert time.monotonic() < deadline, "the precompute did not start within 60 s"
            time.sleep(0.05)


@pytest.mark.parametrize("caller", ["reading", "gone"])
def test_sigterm_stops_a_background_precompute_within_the_grace(
    tiny_llama_dir: Path, tmp_path: Path, caller: str
) -> None:
    """SIGTERM while a long background precompute computes: its caller still reading the stream
    (the drain waits the grace, then the call is cancelled) or gone (the UI abandoned it). Either
    way the computation stops at a checkpoint, and the process exits with 0 within the grace plus
    a margin, without the warning that a computation did not stop.

    The caller is the UI's: a sync client with the default retry policy. Its stream must end when
    the server exits (grpcio's sync stream with retries once waited for its deadline, minutes:
    seqsal.retry leaves streams of the sync clients out of the retries)."""
    with _server(tiny_llama_dir, tmp_path, PRECOMPUTE_GRACE_S) as (process, address, log_path):
        with SaliencyClient(address, timeout=30.0) as client:  # DEFAULT_RETRY, as the UI's
            precompute = _Precompute(client)
            precompute.wait_running()
            if caller == "gone":
                precompute.call.cancel()
                assert precompute.ended.wait(10) and precompute.code == grpc.StatusCode.CANCELLED
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            try:
                returncode = process.wait(timeout=PRECOMPUTE_GRACE_S + EXIT_MARGIN_S + 30)
            except subprocess.TimeoutExpired:
                returncode = None
            elapsed = time.monotonic() - signalled
            told = precompute.ended.wait(10)
        log = log_path.read_text(errors="replace")
    assert returncode == 0, f"exit code {returncode} after {elapsed:.1f} s\n{log}"
    assert elapsed < PRECOMPUTE_GRACE_S + EXIT_MARGIN_S, f"took {elapsed:.1f} s to exit\n{log}"
    assert "signal received" in log and "draining" in log, log
    assert "did not stop" not in log, log
    assert precompute.messages < PRECOMPUTE_PARTS, "the precompute finished: the test proves nothing"
    if caller == "reading":  # the drain gave up on it at the end of the grace, and the caller is told
        assert elapsed >= PRECOMPUTE_GRACE_S - 0.5, f"exited after {elapsed:.1f} s, before the grace\n{log}"
        assert told and precompute.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), (
            precompute.code
        )
    print(
        f"\n[sigterm] caller {caller}: exited {elapsed:.1f} s after SIGTERM (grace {PRECOMPUTE_GRACE_S} s), "
        f"{precompute.messages} of {PRECOMPUTE_PARTS} segments done"
    )


async def test_shutdown_cancels_a_computation_whose_caller_is_still_there(tiny_llama_dir: Path) -> None:
    """After the drain the server closes its serving layer: a precompute still computing then (its
    stream still open) is cancelled and its worker thread ends at the next checkpoint, instead of
    running to the end while the process waits to exit."""
    import asyncio

    from saliency_server.server import SHUTDOWN_WORKER_WAIT_S, build_serving
    from saliency_server.settings import SaliencySettings
    from seqsal.v1 import saliency_pb2

    serving = build_serving(
        SaliencySettings(_env_file=None, models=[f"tiny={tiny_llama_dir}"], ig_batch_size=1)  # type: ignore[call-arg]
    )
    request = saliency_pb2.SaliencyAllSegmentsRequest(
        prompt=PROMPT,
        target=" ".join(f"Part {i}." for i in range(PRECOMPUTE_PARTS)),
        methods=[common_pb2.INTEGRATED_GRADIENTS],
        ig_steps=1024,  # minutes of work, one interpolation point per pass
        granularity=common_pb2.SENTENCES,
    )
    stream = serving.saliency_all_segments(request)
    consumer = asyncio.ensure_future(stream.__anext__())
    (scheduler,) = serving.schedulers.values()
    while not scheduler.running:  # wait for the state: the precompute computes
        assert not consumer.done(), consumer.exception()
        await asyncio.sleep(0.05)
    started = time.monotonic()
    # the server gives the workers SHUTDOWN_WORKER_WAIT_S; a loaded test machine gets more time
    # to reach the next checkpoint, far less than the minutes the whole computation takes
    ended = await asyncio.to_thread(serving.close, 6 * SHUTDOWN_WORKER_WAIT_S)
    assert ended, "the computation was still running after close()"
    assert time.monotonic() - started < 6 * SHUTDOWN_WORKER_WAIT_S
    assert scheduler.depth == 0 and ("cancel", scheduler.order("start")[0]) in scheduler.events
    consumer.cancel()
    await stream.aclose()
    await serving.cache.close()
