"""The saliency server's own metrics, read at scrape time: its result cache, schedulers and the
forward passes kept for reuse (registered on the server's :class:`server_kit.metrics.ServerMetrics`).

* ``seqsal_cache_{hits,misses,errors,corrupt,sets}_total{backend}``: the result cache's counters;
* ``seqsal_scheduler_queue_depth{model, priority, state}``: computations per model, priority
  (``interactive``, ``background``) and state (``waiting``, ``running``, ``paused``);
* ``seqsal_scheduler_wait_seconds{model, priority}``: how long computations waited for their
  first turn (histogram);
* ``seqsal_scheduler_preemptions_total{model, priority}``: running computations paused for more
  urgent work, by the priority they ran at;
* ``seqsal_scheduler_finished_total{model, priority}``: computations completed;
* ``seqsal_forward_cache_bytes{model}``, ``seqsal_forward_cache_lookups_total{model, result}``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from saliency_server.cache import CacheBackend
from saliency_server.forward_cache import ForwardCache
from saliency_server.scheduler import WAIT_BUCKETS, Scheduler

CACHE_COUNTERS = ("hits", "misses", "errors", "corrupt", "sets")


class SaliencyCollector(Collector):
    """The caches' counters and the schedulers' queues of one saliency server."""

    def __init__(self, caches: Sequence[CacheBackend], schedulers: Mapping[str, Scheduler]) -> None:
        self.caches = list(caches)
        self.schedulers = schedulers

    def collect(self) -> Iterator[Metric]:
        if self.caches:
            yield from _cache_metrics(self.caches)
        if self.schedulers:
            yield from _scheduler_metrics(self.schedulers)


def _cache_metrics(caches: Sequence[CacheBackend]) -> Iterator[Metric]:
    families = {
        name: CounterMetricFamily(f"seqsal_cache_{name}", f"Result cache {name}.", labels=["backend"])
        for name in CACHE_COUNTERS
    }
    for cache in caches:
        for name in CACHE_COUNTERS:
            families[name].add_metric([cache.name], float(getattr(cache, name, 0)))
    yield from families.values()


def _scheduler_metrics(schedulers: Mapping[str, Scheduler]) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "seqsal_scheduler_queue_depth",
        "Saliency computations by priority and state.",
        labels=["model", "priority", "state"],
    )
    wait = HistogramMetricFamily(
        "seqsal_scheduler_wait_seconds",
        "Time saliency computations waited for their first turn.",
        labels=["model", "priority"],
    )
    preemptions = CounterMetricFamily(
        "seqsal_scheduler_preemptions",
        "Running saliency computations paused for more urgent work.",
        labels=["model", "priority"],
    )
    finished = CounterMetricFamily(
        "seqsal_scheduler_finished", "Saliency computations completed.", labels=["model", "priority"]
    )
    kept = GaugeMetricFamily(
        "seqsal_forward_cache_bytes", "Bytes of forward passes kept for reuse.", labels=["model"]
    )
    lookups = CounterMetricFamily(
        "seqsal_forward_cache_lookups",
        "Gradient passes that found (hit) or ran (miss) their forward pass.",
        labels=["model", "result"],
    )
    for model, scheduler in schedulers.items():
        if isinstance(scheduler.reserve, ForwardCache):
            kept.add_metric([model], float(scheduler.reserve.bytes_held()))
            lookups.add_metric([model, "hit"], float(scheduler.reserve.hits))
            lookups.add_metric([model, "miss"], float(scheduler.reserve.misses))
        snap = scheduler.snapshot()
        for (priority, state), value in snap["depth"].items():  # type: ignore[attr-defined]
            depth.add_metric([model, priority, state], float(value))
        for priority, value in snap["preemptions"].items():  # type: ignore[attr-defined]
            preemptions.add_metric([model, priority], float(value))
        for priority, value in snap["finished"].items():  # type: ignore[attr-defined]
            finished.add_metric([model, priority], float(value))
        for priority, (counts, total, n) in snap["wait"].items():  # type: ignore[attr-defined]
            buckets = [(str(b), float(c)) for b, c in zip(WAIT_BUCKETS, counts, strict=True)]
            wait.add_metric([model, priority], [*buckets, ("+Inf", float(n))], float(total))
    yield from (depth, wait, preemptions, finished, kept, lookups)
