"""What one instance tells the fleet view, once a second.

Counts come from the instance's own Prometheus registry (nothing new on the request
path) as deltas over a sliding window; per-class and per-workload latency comes from
:meth:`Snapshots.tap`, which sees each finished request's workload, class and duration.
A snapshot is plain JSON: :mod:`proxy.ops.fleetview` sums the fleet's snapshots.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from proxy.control.fleet import N_BUCKETS
from proxy.control.window import BUCKET_BOUNDS_MS
from proxy.pipeline.schedule import cap_at
from proxy.policy import CompiledPolicy

Key = tuple[str, str]  # (what, name): ("pool", "haiku"), ("class", "P0"), ...

#: (metric sample, label grouped by, what it counts): the counters a snapshot windows.
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("sluice_requests_total", "pool", "requests"),
    ("sluice_tokens_settled_total", "pool", "tokens"),
    ("sluice_upstream_latency_seconds_count", "pool", "upstream"),
    ("sluice_admitted_total", "priority", "admitted"),
    ("sluice_refused_total", "priority", "refused"),
    ("sluice_admitted_total", "workload", "admitted"),
    ("sluice_refused_total", "workload", "refused"),
    ("sluice_degraded_total", "workload", "degraded"),
)
_GROUP_KIND = {"pool": "pool", "priority": "class", "workload": "workload"}
#: Gauges read as they are (summed or maxed across the fleet by the view).
_GAUGES = {
    "sluice_in_flight": "in_flight",
    "sluice_pool_concurrency_limit": "limit",
    "sluice_adaptive_limit": "adaptive",
    "sluice_breaker_state": "breaker",
}
#: Batch queue and dead letters (issue #7), shown once the metrics exist.
_QUEUES = ("sluice_batch_queued_records", "sluice_batch_oldest_age_seconds", "sluice_dlq_records")


Totals = dict[Key, dict[str, float]]
#: Sample name -> [(label grouped by, field)], so each sample costs one look-up.
_BY_NAME: dict[str, list[tuple[str, str]]] = defaultdict(list)
for _name, _label, _field in _COUNTERS:
    _BY_NAME[_name].append((_label, _field))
_KEPT = frozenset(_GAUGES) | frozenset(_QUEUES) | {"sluice_workload_paused"}
_THROTTLES = "sluice_upstream_errors_total"
#: Every sample name read_registry looks at: a family without any of them is not collected.
_WANTED = frozenset(_BY_NAME) | _KEPT | {_THROTTLES}


def _collectors(registry: CollectorRegistry) -> list[Collector]:
    """The registry's collectors in its order, less those whose samples read_registry
    would skip: collecting those (the bulk of the registry) was most of a tick's cost."""
    with registry._lock:
        return [
            c
            for c, names in registry._collector_to_names.items()
            if not names or not _WANTED.isdisjoint(names)
        ]


def _samples(collector: Collector) -> Iterator[Sample]:
    """What ``collector.collect()`` would give, less what read_registry never reads.

    A labelled metric's children are read directly: no Metric per family, no name check
    per sample (as collect() makes), and of a histogram only its ``_count`` (read_registry
    wants no bucket or sum; formatting every bucket's ``le`` label once a second was most
    of an idle instance's work). Anything else is collected as Prometheus would.
    """
    # (a metric without labels, a child, a custom collector: collected as Prometheus does)
    labelled = isinstance(collector, MetricWrapperBase) and bool(collector._labelnames)
    if labelled and isinstance(collector, MetricWrapperBase) and not collector._labelvalues:
        yield from _children(collector)
        return
    for family in collector.collect():
        yield from family.samples


def _children(metric: MetricWrapperBase) -> Iterator[Sample]:
    with metric._lock:
        children = metric._metrics.copy()
    name, label_names = metric._name, metric._labelnames
    for values, child in children.items():
        labels = dict(zip(label_names, values, strict=True))
        if isinstance(child, Histogram):
            yield Sample(name + "_count", labels, sum(b.get() for b in child._buckets))
            continue
        for sample in child._child_samples():
            extra = sample.labels
            yield Sample(name + sample.name, {**labels, **extra} if extra else labels, sample.value)


def read_registry(registry: CollectorRegistry) -> tuple[Totals, list[Any]]:
    """Cumulative counters grouped per (kind, name), and the raw gauge samples."""
    totals: Totals = defaultdict(lambda: defaultdict(float))
    gauges: list[Any] = []
    for collector in _collectors(registry):
        for s in _samples(collector):
            wanted = _BY_NAME.get(s.name)
            if wanted is not None:
                for label, field in wanted:
                    # "-": calls that never reached a pool or workload (unknown paths, 404s).
                    value = s.labels.get(label, "-")
                    if value != "-":
                        totals[_GROUP_KIND[label], value][field] += s.value
            elif s.name in _KEPT:
                gauges.append(s)
            elif s.name == _THROTTLES and s.labels.get("error_type") == "ThrottlingException":
                totals["pool", s.labels["pool"]]["throttled"] += s.value
    return totals, gauges


class Snapshots:
    """Windows this instance's counts (``tick`` once a second) and renders its snapshot.

    The window is the difference between the cumulative counts now and ``window_s`` ago,
    so a tick costs one read of the registry, whatever the window's length.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        policy: Callable[[], CompiledPolicy],
        describe: Callable[[], dict[str, Any]],
        instance_id: str,
        window_s: float = 10.0,
        tick_s: float = 1.0,
    ) -> None:
        self._registry = registry
        self._policy = policy
        self._describe = describe
        self.instance_id = instance_id
        # Cumulative latency histograms per (workload, class) pair: one lookup and one C
        # bisect a request; the tick sums them per class and per workload.
        self._pairs: dict[tuple[str | None, str | None], list[int]] = {}
        self._ring: deque[tuple[float, Totals, dict[Key, list[int]]]] = deque(
            [(time.monotonic(), {}, {})], maxlen=max(1, round(window_s / tick_s)) + 1
        )

    def tap(self, workload: str | None, priority: str | None, seconds: float) -> None:
        """Count one finished request's duration for its class and workload (event loop only)."""
        hist = self._pairs.get((workload, priority))
        if hist is None:
            hist = self._pairs[workload, priority] = [0] * N_BUCKETS
        hist[bisect_left(BUCKET_BOUNDS_MS, seconds * 1000)] += 1  # bucket_index, in C

    def _hists(self) -> dict[Key, list[int]]:
        """Cumulative histograms per class and per workload (in the order first seen)."""
        out: dict[Key, list[int]] = {}
        for (workload, priority), hist in self._pairs.items():
            for kind, name in (("class", priority), ("workload", workload)):
                if name is not None:
                    have = out.get((kind, name))
                    out[kind, name] = (
                        hist.copy()
                        if have is None
                        else [a + b for a, b in zip(have, hist, strict=True)]
                    )
        return out

    def tick(self) -> dict[str, Any]:
        """Close one interval and return the snapshot of the window."""
        totals, gauges = read_registry(self._registry)
        hists = self._hists()
        self._ring.append((time.monotonic(), totals, hists))
        then, old_totals, old_hists = self._ring[0]
        groups: dict[str, dict[str, dict[str, Any]]] = {"pool": {}, "class": {}, "workload": {}}
        for (kind, name), fields in totals.items():
            before = old_totals.get((kind, name), {})
            # A counter that went down was reset (a label set re-registered): count from 0.
            groups[kind][name] = {f: max(0.0, v - before.get(f, 0.0)) for f, v in fields.items()}
        for (kind, name), hist in hists.items():
            old = old_hists.get((kind, name))
            window = hist if old is None else [a - b for a, b in zip(hist, old, strict=True)]
            groups[kind].setdefault(name, {})["hist"] = window
        extra = self._gauges(gauges, groups)
        return {
            "id": self.instance_id,
            "at": time.time(),
            "window_s": round(self._ring[-1][0] - then, 3),
            "policy": self._describe(),
            **self._from_policy(groups),
            **extra,
        }

    def _gauges(
        self, gauges: list[Any], groups: dict[str, dict[str, dict[str, Any]]]
    ) -> dict[str, Any]:
        paused: list[str] = []
        queues: dict[str, dict[str, float]] = defaultdict(dict)
        dlq: dict[str, float] = {}
        for s in gauges:
            if s.name in _GAUGES:
                groups["pool"].setdefault(s.labels["pool"], {})[_GAUGES[s.name]] = s.value
            elif s.name == "sluice_workload_paused":
                if s.value >= 1:
                    paused.append(s.labels["workload"])
            elif s.name == "sluice_dlq_records":
                dlq[f"{s.labels.get('workload', '-')}|{s.labels.get('reason', '-')}"] = s.value
            else:
                field = "queued" if s.name == "sluice_batch_queued_records" else "oldest_s"
                queues[s.labels.get("workload", "-")][field] = s.value
        return {"paused": sorted(paused), "batch": dict(queues), "dlq": dlq}

    def _from_policy(self, groups: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        """Rows for everything the policy declares (idle ones too), with quotas and shares."""
        pol = self._policy().policy
        for name, pool in pol.models.items():
            row = groups["pool"].setdefault(name, {})
            row["quota"] = {
                "rpm": pool.requests_per_minute,
                "tpm": pool.tokens_per_minute,
                "concurrency": pool.concurrency,
            }
        for name, cls in pol.priorities.items():
            row = groups["class"].setdefault(name, {})
            row.update(share=cls.share, target_p99_ms=cls.target_p99_ms)
        now = datetime.now(UTC)
        schedules: dict[str, Any] = {}
        for name, wl in pol.workloads.items():
            groups["workload"].setdefault(name, {})["class"] = wl.priority
            cap = cap_at(wl.schedule, now) if wl.schedule is not None else None
            if cap is not None:
                schedules[name] = {"concurrency": cap.concurrency, "window": cap.window}
        return {
            "pools": groups["pool"],
            "classes": groups["class"],
            "workloads": groups["workload"],
            "schedules": schedules,
        }
