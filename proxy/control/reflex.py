"""The throttle reflex: Bedrock's first throttle stops the fleet admitting past what is in
flight, at once instead of at the next control interval.

Why: a limit above Bedrock's quota does not cost one throttle, it churns. Bedrock refuses
in milliseconds, so the excess slot frees at once and the next caller admitted into it is
refused too, at the arrival rate, until the interval's controller cuts (up to an interval
plus a tick later). A probe one slot above a learned quota, or a start limit above a quota
nobody knew, cost 2-6 throttles per episode in the sweep that way.

So the instance that sees a throttle lowers the fleet limit to the calls in flight right
now minus the one refused, read and written in one step (``fleet_reflex.lua``), and
records that level for the fleet (``q``) so every instance learns the quota from the
throttle itself rather than from a count sampled once per tick. It only lowers, never
below the floor nor below what Bedrock served on average lately (the interval's, or the
last two mean calls' where lower, so a cut is followed; a
per-minute quota can throttle while few calls are in flight). Each throttle may fire it,
one at a time per pool and instance and at most every :data:`GAP_S`: a burst sent at once
is read with the calls Bedrock is refusing still in flight, so the next throttle reads
again, lower. The controller still cuts by its law.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

from proxy.control.exchange import Reflexed
from proxy.control.fleet import FleetStats, FleetUnavailable
from proxy.control.limits import limit_event
from proxy.control.metrics import AdaptivityMetrics
from proxy.tasks import stop_tasks

log = logging.getLogger("sluice.adaptive")

#: Least time between two reflexes of one instance on one pool: in a throttling storm,
#: at most 20 small scripts a second per pool and instance.
GAP_S: Final = 0.05
#: After a failed reflex (Redis unreachable), the next waits this long: an outage during
#: a storm costs one warning a second per pool, not one per throttle.
FAILED_GAP_S: Final = 1.0
#: A refused call's lease is left out of the reading for this long at most (it is given
#: back, or sent again, well within it: then it is forgotten at once).
REFUSED_S: Final = 10.0
#: ... and at most this many of them per reading (the script checks each).
MAX_OTHERS: Final = 64


class ThrottleReflex:
    """Fires the reflex for a pool on a throttle, in the background."""

    def __init__(
        self,
        fleet: FleetStats,
        metrics: AdaptivityMetrics,
        floors: dict[str, int],
        applied: Callable[[str, Reflexed, float], None],
    ) -> None:
        """``floors``: each adaptive pool's floor;
        ``applied(pool, result, sent)``: told what the reflex sent at ``sent`` read and did,
        so the instance acts on it before its next tick (a retry looks for headroom under
        the lowered limit)."""
        self._fleet = fleet
        self._metrics = metrics
        self._floors = floors
        #: Per pool: what Bedrock served on average lately (the interval, or two mean calls
        #: where lower; a lower
        #: bound, Little's law), set by the controller each tick. The reflex never cuts
        #: below it: a per-minute quota can throttle while few calls are in flight.
        self.granted: dict[str, float] = {}
        self._applied = applied
        self._next: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: Per pool: leases of calls Bedrock refused, not sent again yet (lease -> when).
        self._refused: dict[str, dict[str, float]] = {}
        self._closed = False

    def fire(self, pool: str, lease: str | None = None) -> None:
        """Bedrock throttled a call of ``pool`` holding ``lease`` (request path: sync,
        never raises)."""
        if self._closed or pool not in self._floors:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if lease is not None:
            # Every refused call is remembered, fired for or not: a burst Bedrock refused
            # at once is read without the calls it refused that still hold their lease.
            refused = self._refused.setdefault(pool, {})
            refused[lease] = loop.time()
            if len(refused) > MAX_OTHERS:
                self._forget_old(refused, loop.time())
        if pool in self._tasks or loop.time() < self._next.get(pool, 0.0):
            return
        self._next[pool] = loop.time() + GAP_S
        task = loop.create_task(self._run(pool, lease))
        self._tasks[pool] = task
        task.add_done_callback(lambda _: self._tasks.pop(pool, None))

    def resent(self, pool: str, lease: str | None) -> None:
        """The refused call holding ``lease`` is sent again (or gave its lease up): it
        counts in readings again."""
        refused = self._refused.get(pool)
        if refused is not None and lease is not None:
            refused.pop(lease, None)

    @staticmethod
    def _forget_old(refused: dict[str, float], now: float) -> None:
        for lease, at in list(refused.items()):
            if now - at > REFUSED_S:
                del refused[lease]
        while len(refused) > MAX_OTHERS:  # oldest first (insertion order)
            del refused[next(iter(refused))]

    async def _run(self, pool: str, lease: str | None) -> None:
        try:
            lowest = max(self._floors[pool], int(self.granted.get(pool, 0.0)))
            # Read when the script is sent: throttles that arrived since the fire count too.
            refused = self._refused.get(pool, {})
            self._forget_old(refused, asyncio.get_running_loop().time())
            others = [other for other in refused if other != lease]
            sent = time.perf_counter()
            result = await self._fleet.reflex(pool, lowest, lease, others)
        except Exception as exc:  # FleetUnavailable, or a bug: never lost, never fatal
            self._metrics.errors.labels("reflex").inc()
            self._next[pool] = asyncio.get_running_loop().time() + FAILED_GAP_S
            unexpected = not isinstance(exc, FleetUnavailable)
            log.log(
                logging.ERROR if unexpected else logging.WARNING,
                "throttle reflex failed",
                exc_info=unexpected,
                extra={"fields": {"event": "reflex_failed", "pool": pool, "error": str(exc)}},
            )
            return
        live, before, after, *_ = result
        self._fleet.observe_level(pool, live)
        self._applied(pool, result, sent)
        if before is not None and after is not None and after < before:
            self._metrics.reflexes.labels(pool).inc()
            reason = f"throttle reflex: Bedrock throttled with {live} in flight"
            limit_event(self._metrics, pool, before, after, reason)

    async def landed(self, pool: str, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) for the reflex running for ``pool``, if one is: a retry
        judged after it sees the limit it set. Never raises (but for its own cancellation)."""
        task = self._tasks.get(pool)
        if task is not None and timeout_s > 0:
            await asyncio.wait({task}, timeout=timeout_s)

    def pending(self) -> set[str]:
        """The pools with a reflex running now."""
        return set(self._tasks)

    async def close(self) -> None:
        """Stop any reflex still running; none starts after this."""
        self._closed = True
        await stop_tasks(list(self._tasks.values()), "throttle reflex")
