"""Leases of settles lost to a store failure, released again once Redis answers.

A settle that fails (Redis unreachable, a failover) leaves its calls' leases in Redis;
when Redis comes back with its data, those finished calls would still hold their slots
and refuse new calls for up to a lease TTL. So their leases are sent again as a release
only (the settle script with nothing to refund: a ZREM, which may run twice without
harm; the token refund stays lost) every :data:`RELEASE_RETRY_S`, one timer per pool,
until it lands or the lease would have expired anyway. Closing the store drops what is
still waiting (those leases expire with their TTL): a shutdown during an outage does not
wait for releases that cannot land.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from proxy.admission import AdmitPlan, StoreUnavailable
from proxy.backend.admit_wire import MAX_BATCH, Queue, Settle, settle_call
from proxy.backend.runner import ScriptRunner, event
from proxy.tasks import stop_tasks

__all__ = ["RELEASE_RETRY_S", "LateReleases"]

#: How often the leases of lost settles are released again.
RELEASE_RETRY_S: Final = 0.5

#: (plan, lease, the loop's time past which the lease has expired anyway)
_Lease = tuple[AdmitPlan, str, float]


class LateReleases:
    """Per pool, the leases of lost settles still to release (see the module docstring)."""

    def __init__(self, runner: ScriptRunner, log: logging.Logger) -> None:
        self._runner = runner
        self._log = log
        #: Pool key -> its queue and the leases waiting for the next try.
        self._waiting: dict[str, tuple[Queue, list[_Lease]]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def lost(self, q: Queue, batch: list[Settle]) -> None:
        """The settles of ``batch`` were lost: release their leases later."""
        now = asyncio.get_running_loop().time()
        self._later(q, [(p, lease, now + p.lease_ttl_ms / 1000) for p, lease, *_ in batch])

    def _later(self, q: Queue, leases: list[_Lease]) -> None:
        if self._closed or not leases:
            return
        key = q.keys.pool
        entry = self._waiting.get(key)
        if entry is None:
            entry = self._waiting[key] = (q, [])
            loop = asyncio.get_running_loop()
            self._timers[key] = loop.call_later(RELEASE_RETRY_S, self._send, key)
        entry[1].extend(leases)

    def _send(self, key: str) -> None:
        self._timers.pop(key, None)
        q, leases = self._waiting.pop(key)
        now = asyncio.get_running_loop().time()
        leases = [item for item in leases if item[2] > now]
        if leases and not self._closed:
            task = asyncio.get_running_loop().create_task(self._release(q, leases))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _release(self, q: Queue, leases: list[_Lease]) -> None:
        released = 0
        for start in range(0, len(leases), MAX_BATCH):
            part = leases[start : start + MAX_BATCH]
            keys, args = settle_call(q, [(plan, lease, 0, 0) for plan, lease, _ in part], [])
            try:
                released += int(await self._runner.run("settle", keys, args))
            except StoreUnavailable:  # (counted once, when the settle was lost)
                self._later(q, part)
        if released:
            pool = leases[0][0].scope
            event(self._log, logging.WARNING, "store_leases_released_late", pool=pool,
                  leases=released)  # fmt: skip

    async def close(self) -> None:
        """Drop what waits and stop the releases under way (their leases expire)."""
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._waiting.clear()
        await stop_tasks(list(self._tasks), "late lease releases")
