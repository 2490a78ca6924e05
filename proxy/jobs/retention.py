"""Batch retention: each instance sweeps its queue for batches past
``server.jobs.retention_hours``, and counts every batch deleted (on request or by it).

Redis expires a finished batch by itself (the script that finishes it sets the expiry);
its sweep only removes what cannot expire with it (index entry, dead letters). The
SQLite file has no expiry: its sweep deletes the batches, a bounded number per pass.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter

from proxy.jobs.queue import JobQueue, QueueUnavailable
from proxy.policy import PolicyRef
from proxy.tasks import stop_tasks

log = logging.getLogger("sluice.jobs")
#: Sweep at a tenth of the retention, within these bounds: a week's retention is swept
#: every minute, a test's few seconds every second.
_MIN_PERIOD_S, _MAX_PERIOD_S = 1.0, 60.0
WHY = ("request", "retention")


class Retention:
    """The sweep loop of one instance and the ``sluice_batches_deleted_total`` counter."""

    def __init__(self, queue: JobQueue, policy: PolicyRef, registry: CollectorRegistry) -> None:
        self.queue = queue
        self._policy = policy
        self.deleted = Counter(
            "sluice_batches_deleted",
            "Batches deleted with their output and dead letters, by why: 'request' (DELETE "
            "/sluice/v1/batches/{id}) or 'retention' (server.jobs.retention_hours after "
            "they finished; on Redis counted when the sweep finds them expired).",
            ["why"],
            registry=registry,
        )
        for why in WHY:
            self.deleted.labels(why)  # exported at 0, so a rate() has a series from the start
        self._tasks: list[asyncio.Task[None]] = []

    def period_s(self) -> float:
        """How long between two sweeps under the policy in force."""
        retention_s = self._policy.current.policy.server.jobs.retention_hours * 3600
        return min(_MAX_PERIOD_S, max(_MIN_PERIOD_S, retention_s / 10))

    async def start(self) -> None:
        """Start sweeping."""
        self._tasks = [asyncio.create_task(self._loop())]

    async def close(self) -> None:
        """Stop sweeping (a sweep cut short is finished by the next one, anywhere)."""
        await stop_tasks(self._tasks, "batch retention")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s())
            try:
                removed = await self.queue.sweep()
            except QueueUnavailable as exc:
                log.warning("batch retention sweep failed: %s", exc)
                continue
            except Exception:
                log.exception("batch retention sweep failed; it runs again shortly")
                continue
            if removed:
                self.deleted.labels("retention").inc(removed)
                log.info(
                    "batches deleted by retention",
                    extra={"fields": {"batches": removed, "retention_hours":
                                      self._policy.current.policy.server.jobs.retention_hours}},
                )  # fmt: skip
