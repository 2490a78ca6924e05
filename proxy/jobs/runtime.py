"""What the batch routes and workers share inside one Application, and its lifecycle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from proxy.jobs.admit import RecordAdmission
from proxy.jobs.metrics import JobMetrics
from proxy.jobs.queue import DEFAULT_RETENTION_S, BatchMeta, DeadLetter, JobQueue, Stream
from proxy.jobs.retention import Retention
from proxy.jobs.worker import Worker
from proxy.metrics import Metrics
from proxy.policy import CompiledPolicy, PolicyRef

log = logging.getLogger("sluice.jobs")


@dataclass(slots=True)
class Jobs:
    """The queue, this instance's worker (None when disabled) and the metrics they feed."""

    policy_ref: PolicyRef
    queue: JobQueue
    metrics_app: Metrics
    metrics: JobMetrics
    worker: Worker | None
    retention: Retention

    @property
    def policy(self) -> CompiledPolicy:
        """The policy in force (hot reload swaps it)."""
        return self.policy_ref.current

    def submitted(self, meta: BatchMeta) -> None:
        """Start on a batch submitted here without waiting for the watcher's next look."""
        if self.worker is not None:
            self.worker.wake(meta.stream)

    def replayed(self, entry: DeadLetter) -> None:
        """Same for a replayed dead letter."""
        if self.worker is not None:
            self.worker.wake(Stream(entry.pool, entry.workload))


JOBS = web.AppKey("jobs", Jobs)


def open_queue(
    redis_url: str | None,
    sqlite_path: str,
    fleet: str | None = None,
    retention_s: Callable[[], float] = lambda: DEFAULT_RETENTION_S,
) -> JobQueue:
    """Redis Streams with ``--redis-url`` (``fleet``'s own keys), else the embedded SQLite
    file; finished batches are kept ``retention_s()`` seconds."""
    if redis_url:
        from proxy.backend.job_queue import RedisQueue

        return RedisQueue(redis_url, fleet=fleet, retention_s=retention_s)
    from proxy.jobs.sqlite_queue import SqliteQueue

    return SqliteQueue(sqlite_path, retention_s)


def lifecycle(
    redis_url: str | None,
    fleet: str | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that runs after the app's own (store, upstream, adaptivity)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from proxy.app import METRICS, POLICY_REF, STORE, UPSTREAM
        from proxy.ops.live import LIVE

        ref, metrics = app[POLICY_REF], app[METRICS]
        policy = ref.current
        cfg = policy.policy.server.jobs
        queue = open_queue(
            redis_url,
            cfg.sqlite_path,
            fleet,
            lambda: ref.current.policy.server.jobs.retention_hours * 3600,
        )
        await queue.start()
        job_metrics = JobMetrics(metrics.registry)
        # Also where workers are off: a store nobody drains still keeps only what it should.
        retention = Retention(queue, ref, metrics.registry)
        await retention.start()
        worker = None
        if cfg.enabled:
            live = app[LIVE]
            admission = RecordAdmission(ref, app[STORE], metrics, lambda: live.adaptivity)
            worker = Worker(
                queue,
                ref,
                admission,
                app[UPSTREAM],
                job_metrics,
                slots=cfg.workers,
                lease_s=cfg.lease_seconds,
            )
            await worker.start()
        app[JOBS] = Jobs(ref, queue, metrics, job_metrics, worker, retention)
        yield
        await retention.close()
        if worker is not None:
            await worker.close()
        await queue.close()

    return ctx
