"""The batch queue's metrics: the runbooks' QueueDepth, QueueAge and DLQ>0 alarms.

Gauges describe the fleet's queue (read from the store by every instance every few
seconds); counters count what this instance's workers did.
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.jobs.queue import JobQueue, Stream


class JobMetrics:
    """Registered in the Application's registry, next to the request metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.queued = Gauge(
            "sluice_batch_queued_records",
            "Batch records waiting or in flight, fleet-wide, per workload.",
            ["workload"],
            registry=registry,
        )
        self.oldest_age = Gauge(
            "sluice_batch_oldest_age_seconds",
            "Age of the oldest batch record not finished yet, per workload.",
            ["workload"],
            registry=registry,
        )
        self.drain_rate = Gauge(
            "sluice_batch_drain_rate",
            "Batch records finished per second over the last minute, fleet-wide, per workload.",
            ["workload"],
            registry=registry,
        )
        self.records = Counter(
            "sluice_batch_records",
            "Batch records finished by this instance, by outcome "
            "(succeeded, dead_lettered, cancelled, abandoned: written by a submit that failed "
            "half-way, never run).",
            ["workload", "outcome"],
            registry=registry,
        )
        self.attempts = Counter(
            "sluice_batch_attempts",
            "Upstream attempts of batch records: 'first', 'redelivered' (taken over after a "
            "lease expired) or the error type that was retried.",
            ["reason"],
            registry=registry,
        )
        self.dlq = Gauge(
            "sluice_dlq_records",
            "Dead-lettered batch records waiting for replay or discard, by workload and reason.",
            ["workload", "reason"],
            registry=registry,
        )
        self.replay_skipped = Counter(
            "sluice_dlq_replay_skipped",
            "Dead letters a replay left in place, by workload and why (batch_cancelled, "
            "batch_gone, already_replayed).",
            ["workload", "reason"],
            registry=registry,
        )
        self.discarded = Counter(
            "sluice_dlq_discarded",
            "Dead letters discarded for good (their records keep their error lines), by "
            "workload and reason.",
            ["workload", "reason"],
            registry=registry,
        )
        self._dlq_seen: set[tuple[str, str]] = set()

    async def refresh(self, queue: JobQueue, streams: set[Stream]) -> None:
        """Read depth, age and drain rate of every queue, and dead-letter counts, from the store.

        Counts only: every instance runs this every few seconds, and loading every dead
        letter (20,000 of them are 41 MB) stalled the event loop for 250 ms each time."""
        by_stream = {}
        for stream in sorted(streams):
            n, age = await queue.depth(stream)
            by_stream[stream] = (n, age, await queue.drain_rate(stream))
        self.set_depth(by_stream)
        self.set_dead_letters(await queue.dead_letter_counts())

    def set_depth(self, by_stream: dict[Stream, tuple[int, float, float]]) -> None:
        """Sum queue depth and drain rate per workload; the oldest age is the maximum."""
        depth: Tally[str] = Tally()
        rate: dict[str, float] = {}
        age: dict[str, float] = {}
        for stream, (n, oldest, drain) in by_stream.items():
            depth[stream.workload] += n
            rate[stream.workload] = rate.get(stream.workload, 0.0) + drain
            age[stream.workload] = max(age.get(stream.workload, 0.0), oldest)
        for workload in rate:
            self.queued.labels(workload).set(depth[workload])
            self.oldest_age.labels(workload).set(age[workload])
            self.drain_rate.labels(workload).set(rate[workload])

    def set_dead_letters(self, counts: dict[tuple[str, str], int]) -> None:
        """Counts per (workload, reason); reasons that emptied go back to zero, not away."""
        for key in self._dlq_seen | set(counts):
            self.dlq.labels(*key).set(counts.get(key, 0))
        self._dlq_seen |= set(counts)
