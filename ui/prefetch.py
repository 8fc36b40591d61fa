"""The background precompute of every target segment (SaliencyAllSegments at background priority).

A click goes before any precompute on the server, so nothing here pauses; what the stream
returns is kept, so a click on a finished segment needs no call.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from seqsal import errors
from seqsal.client import WholeMessages, error_from_rpc
from seqsal.request_ids import REQUEST_ID_KEY, new_request_id
from seqsal.v1 import saliency_pb2
from ui.clients import CALL_TIMEOUT_S, POOL, Endpoints, describe_error
from ui.targets import request_key

#: Prefetch all segments with integrated gradients only up to this many target segments.
MAX_IG_PREFETCH_SEGMENTS = 16


@dataclass
class Progress:
    """Progress of one SaliencyAllSegments prefetch (a snapshot; the live one is guarded by a lock)."""

    key: str
    total: int | None = None
    done: int = 0
    #: Target segment indices whose saliency is in the server's cache now.
    done_indices: frozenset[int] = frozenset()
    error: str | None = None
    finished: bool = False
    cancelled: bool = False
    #: the stream's x-request-id (ask the server where it stands: ui/queue_status.py)
    request_id: str = ""
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None

    @property
    def elapsed_s(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started_at


class _Job:
    def __init__(self, key: str, endpoints: Endpoints) -> None:
        self.progress = Progress(key=key, request_id=new_request_id())
        self.endpoints = endpoints
        self.call: grpc.Future | None = None
        self.cancel_requested = False
        self.thread: threading.Thread | None = None


class Prefetcher:
    """Runs ``SaliencyAllSegments`` (background priority) in background threads.

    The server schedules: a click goes before any precompute, this one's or another user's, so
    nothing here pauses. What the stream returns is kept (a bounded LRU of responses, by job and
    segment): :meth:`response` answers a click on a finished segment without a call.

    Jobs are keyed by request content (two sessions asking the same thing share one job) and
    owned by ``(session, side)`` slots: starting a new job for a slot cancels the slot's previous
    job unless another slot still wants it. :meth:`progress` is safe from any thread.
    """

    def __init__(self, max_jobs: int = 64, max_responses: int = 512) -> None:
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._owners: dict[str, str] = {}
        self._requests: dict[str, tuple[Endpoints, saliency_pb2.SaliencyAllSegmentsRequest]] = {}
        self._responses: OrderedDict[tuple[str, int], saliency_pb2.SaliencyResponse] = OrderedDict()
        self.max_jobs = max_jobs
        self.max_responses = max_responses

    def response(self, key: str, segment_index: int) -> saliency_pb2.SaliencyResponse | None:
        """The response the stream of job ``key`` returned for a target segment, if it has."""
        with self._lock:
            item = self._responses.get((key, segment_index))
            if item is not None:
                self._responses.move_to_end((key, segment_index))
            return item

    def _keep(self, key: str, message: saliency_pb2.SaliencyAllSegmentsResponse) -> None:
        with self._lock:
            self._responses[(key, message.segment_index)] = message.saliency
            self._responses.move_to_end((key, message.segment_index))
            while len(self._responses) > self.max_responses:
                self._responses.popitem(last=False)

    def start(
        self, owner: str, endpoints: Endpoints, request: saliency_pb2.SaliencyAllSegmentsRequest
    ) -> str:
        """Start (or join) the prefetch of ``request`` for ``owner``; returns the job key."""
        key = request_key(request)
        with self._lock:
            previous = self._owners.get(owner)
            self._owners[owner] = key
            self._requests[owner] = (endpoints, request)
            if previous and previous != key and previous not in self._owners.values():
                old = self._jobs.get(previous)
                if old is not None and not old.progress.finished:
                    old.cancel_requested = True
                    if old.call is not None:
                        old.call.cancel()
            job = self._jobs.get(key)
            dead = job is None or job.cancel_requested or job.progress.error or job.progress.cancelled
            if not dead:
                assert job is not None
                self._jobs.move_to_end(key)
                return key
            job = _Job(key, endpoints)
            self._jobs[key] = job
            self._trim()
        job.thread = threading.Thread(
            target=self._run, args=(job, endpoints, request), name=f"seqsal-prefetch-{key[:8]}", daemon=True
        )
        job.thread.start()
        return key

    def _trim(self) -> None:
        while len(self._jobs) > self.max_jobs:
            for key, job in self._jobs.items():
                if job.progress.finished:
                    del self._jobs[key]
                    break
            else:
                return

    def _run(self, job: _Job, endpoints: Endpoints, request: saliency_pb2.SaliencyAllSegmentsRequest) -> None:
        client = POOL.saliency(endpoints)
        try:
            metadata = (*client.metadata, (REQUEST_ID_KEY, job.progress.request_id))
            call = client.stub.SaliencyAllSegments(request, timeout=CALL_TIMEOUT_S, metadata=metadata)
            with self._lock:
                job.call = call
                if job.cancel_requested:
                    call.cancel()
            whole = WholeMessages()
            for message in call:
                self._keep(job.progress.key, whole(message))
                with self._lock:
                    job.progress.total = message.segment_count
                    job.progress.done += 1
                    job.progress.done_indices = job.progress.done_indices | {message.segment_index}
        except grpc.RpcError as exc:
            error = error_from_rpc(exc)
            with self._lock:
                if job.cancel_requested or isinstance(error, errors.CancelledError):
                    job.progress.cancelled = True
                else:
                    job.progress.error = describe_error(error, "saliency", endpoints.saliency)
            if isinstance(error, errors.UnavailableError):
                POOL.reset("saliency", endpoints.saliency)
        except Exception as exc:  # a bug must not kill the thread silently
            with self._lock:
                job.progress.error = f"Prefetch failed: {exc}"
        finally:
            with self._lock:
                if job.progress.total is None and not job.progress.error and not job.progress.cancelled:
                    job.progress.total = job.progress.done
                job.progress.finished = True
                job.progress.finished_at = time.monotonic()

    def progress(self, key: str) -> Progress | None:
        """A copy of a job's progress (``None`` for an unknown key)."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                return None
            p = job.progress
            return Progress(
                key=p.key,
                total=p.total,
                done=p.done,
                done_indices=p.done_indices,
                error=p.error,
                finished=p.finished,
                cancelled=p.cancelled,
                request_id=p.request_id,
                started_at=p.started_at,
                finished_at=p.finished_at,
            )

    def endpoints(self, key: str) -> Endpoints | None:
        """Where job ``key`` runs."""
        with self._lock:
            job = self._jobs.get(key)
            return None if job is None else job.endpoints

    def cancel(self, key: str) -> bool:
        """Cancel a running job (e.g. to let a click through first); True if it was running."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.progress.finished or job.cancel_requested:
                return False
            job.cancel_requested = True
            if job.call is not None:
                job.call.cancel()
            return True

    def sweep(self, alive: Callable[[str], bool]) -> list[str]:
        """Forget owners that are gone (``alive(owner)`` is false) and cancel the jobs only they wanted."""
        with self._lock:
            gone = [owner for owner in self._owners if not alive(owner)]
            for owner in gone:
                del self._owners[owner]
                self._requests.pop(owner, None)
            wanted = set(self._owners.values())
            stale = [k for k, job in self._jobs.items() if k not in wanted and not job.progress.finished]
        for key in stale:
            self.cancel(key)
        return gone

    def wait(self, key: str, timeout: float) -> Progress | None:
        """Block until a job finishes (for tests and scripts); returns its progress."""
        with self._lock:
            job = self._jobs.get(key)
        if job is not None and job.thread is not None:
            job.thread.join(timeout)
        return self.progress(key)


PREFETCHER = Prefetcher()
