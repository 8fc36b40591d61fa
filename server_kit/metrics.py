"""Prometheus metrics of one server, in its own registry, served over HTTP on their own port.

Metric names (all servers):

* ``seqsal_grpc_requests_total{rpc, code}``: finished calls by method and status code;
* ``seqsal_grpc_request_duration_seconds{rpc, code}``: their latency (histogram);
* ``seqsal_grpc_requests_in_progress{rpc}``: calls running now;
* ``seqsal_tokens_processed_total{model, kind}``: tokens of answered calls; ``kind`` is ``prompt``,
  ``target`` (saliency and Score) or ``generated``;
* ``seqsal_model_load_seconds{model}``: how long each model took to load;
* ``seqsal_queue_depth{state}``: ``running`` and ``waiting`` requests (saliency admission; on the
  inference server, generation calls in flight as ``running``);
The saliency server adds (:mod:`saliency_server.metrics`, registered with :meth:`ServerMetrics.watch`):

* ``seqsal_scheduler_queue_depth{model, priority, state}``: saliency computations per model,
  priority (``interactive``, ``background``) and state (``waiting``, ``running``, ``paused``);
* ``seqsal_scheduler_wait_seconds{model, priority}``: how long computations waited for their
  first turn (histogram);
* ``seqsal_scheduler_preemptions_total{model, priority}``: running computations paused for more
  urgent work, by the priority they ran at;
* ``seqsal_scheduler_finished_total{model, priority}``: computations completed;
* ``seqsal_cache_{hits,misses,errors,corrupt,sets}_total{backend}``: the result cache's counters;
* ``seqsal_forward_cache_bytes{model}`` / ``seqsal_forward_cache_lookups_total{model, result}``: the
  forward passes kept for reuse.

And every server:

* ``seqsal_gpu_memory_allocated_bytes{device}`` / ``seqsal_gpu_memory_reserved_bytes{device}``:
  PyTorch's CUDA memory, when there is a GPU;
* ``seqsal_saliency_cancelled_total{rpc, reason}``: saliency calls stopped before they finished,
  because the client cancelled (``reason="cancelled"``) or its deadline passed (``"deadline"``);
  counted once the computation has stopped (nothing of it is cached);
* ``seqsal_build_info{service, version}``: always 1.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from importlib import metadata as _metadata
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger("seqsal.metrics")

#: Latency buckets in seconds: from a cached lookup to a long integrated-gradients run.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _version() -> str:
    try:
        return _metadata.version("seqsal")
    except _metadata.PackageNotFoundError:
        return "unknown"


class _StateCollector(Collector):
    """Values read at scrape time: queue depth and GPU memory."""

    def __init__(self) -> None:
        self.queue: Callable[[], dict[str, int]] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.queue is not None:
            depth = GaugeMetricFamily("seqsal_queue_depth", "Requests running or waiting.", labels=["state"])
            for state, value in self.queue().items():
                depth.add_metric([state], float(value))
            yield depth
        yield from _gpu_memory()


def _gpu_memory() -> Iterator[Metric]:
    torch = sys.modules.get("torch")  # never import torch just for this (the openai backend needs none)
    if torch is None:
        return
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        allocated = GaugeMetricFamily(
            "seqsal_gpu_memory_allocated_bytes", "CUDA memory held by tensors.", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            "seqsal_gpu_memory_reserved_bytes",
            "CUDA memory reserved by the caching allocator.",
            labels=["device"],
        )
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            allocated.add_metric([device], float(torch.cuda.memory_allocated(index)))
            reserved.add_metric([device], float(torch.cuda.memory_reserved(index)))
    except Exception as exc:  # a broken driver must not break the scrape
        logger.debug("GPU memory not readable: %s", exc)
        return
    yield allocated
    yield reserved


class ServerMetrics:
    """The metrics of one gRPC server (a private registry, so several servers can share a process).

    Args:
        service: the server's name (``saliency`` or ``inference``), exported in ``seqsal_build_info``.
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "seqsal_grpc_requests", "Finished gRPC calls.", ["rpc", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "seqsal_grpc_request_duration_seconds",
            "gRPC call latency.",
            ["rpc", "code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "seqsal_grpc_requests_in_progress", "gRPC calls running now.", ["rpc"], registry=self.registry
        )
        self.tokens = Counter(
            "seqsal_tokens_processed", "Tokens of answered calls.", ["model", "kind"], registry=self.registry
        )
        self.model_load = Gauge(
            "seqsal_model_load_seconds", "Model load time.", ["model"], registry=self.registry
        )
        self.cancelled = Counter(
            "seqsal_saliency_cancelled",
            "Saliency calls stopped early: the client cancelled or its deadline passed.",
            ["rpc", "reason"],
            registry=self.registry,
        )
        info = Gauge("seqsal_build_info", "Always 1.", ["service", "version"], registry=self.registry)
        info.labels(service, _version()).set(1)
        self._state = _StateCollector()
        self.registry.register(self._state)
        self._http: Any = None
        self._thread: Any = None

    # --- what the servers report --------------------------------------------------------------------

    def observe_call(self, rpc: str, code: str, seconds: float) -> None:
        """Count one finished call."""
        self.requests.labels(rpc, code).inc()
        self.latency.labels(rpc, code).observe(seconds)

    def count_tokens(self, model: str, kind: str, count: int) -> None:
        """Add ``count`` tokens of ``kind`` (prompt, target, generated) for ``model``."""
        if count > 0:
            self.tokens.labels(model, kind).inc(count)

    def count_cancelled(self, rpc: str, reason: str) -> None:
        """Count one call stopped early (``reason``: ``cancelled`` or ``deadline``)."""
        self.cancelled.labels(rpc, reason).inc()

    def watch(self, collector: Collector) -> None:
        """Export a server's own values, read at scrape time (the saliency server's: its caches and
        schedulers, :mod:`saliency_server.metrics`)."""
        self.registry.register(collector)

    def watch_queue(self, depth: Callable[[], dict[str, int]]) -> None:
        """Export ``depth()`` (state -> requests) as ``seqsal_queue_depth``."""
        self._state.queue = depth

    # --- the HTTP endpoint -----------------------------------------------------------------------

    def start_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0 = a free port) in a daemon thread; returns the port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        logger.info("%s metrics on http://%s:%d/metrics", self.service, host, bound)
        return bound

    def stop_http(self) -> None:
        """Stop the HTTP endpoint (if started)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
