"""Waiting instead of refusing: a request may wait up to its ``max_wait`` for capacity.

The store decides who may go (``admit.lua`` / :mod:`proxy.admission.waitqueue`: higher
classes first, FIFO within a class, fleet-wide); this module is the local half that
makes waiting cheap:

* a waiter sleeps on a future, not on a poll. It is woken by a release anywhere in the
  fleet (the store's pub/sub message, or a local settle in the embedded store), by its own
  timer when a bucket refused it (the store says exactly when there will be room), or by
  a jittered safety timer (a lost message, a holder that died without settling);
* a wake-up wakes this instance's waiters of the pool in (rank, arrival) order in one
  event-loop tick, so the store's batching turns them into ONE script call;
* the number of waiters per pool is bounded: past the bound a request is decided at once,
  as if it could not wait. A deadline that cannot be met is refused at once by the store.

Every waiter leaves the store's wait sets when it stops waiting (admitted, refused,
timed out, cancelled): a withdrawal queued like a settle, never awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections.abc import Awaitable, Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.admission.model import (
    EXACT_CODES,
    LIMIT_NAMES,
    TIER_SCOPE,
    WAIT_NO,
    AdmitPlan,
    Decision,
)
from proxy.admission.waitqueue import WaitTicket

Attempt = Callable[[AdmitPlan, int, "WaitTicket | None"], Awaitable[Decision]]
Withdraw = Callable[[AdmitPlan, WaitTicket], None]
Prepare = Callable[[str], Awaitable[None]]

_EXACT_NAMES: Final = frozenset(LIMIT_NAMES[c] for c in EXACT_CODES)
_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class WaitMetrics:
    """The waiting metrics, registered on a registry (``Metrics().registry`` in the app)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.depth = Gauge(
            "sluice_wait_queue_depth",
            "Requests waiting for admission on this instance, by model pool and priority.",
            ["pool", "priority"],
            registry=r,
        )
        self.seconds = Histogram(
            "sluice_wait_seconds",
            "Time requests spent waiting for admission, by outcome "
            "(admitted, timeout, refused, cancelled, error).",
            ["pool", "priority", "outcome"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.timeouts = Counter(
            "sluice_wait_timeouts",
            "Waiting requests refused because their max_wait ran out.",
            ["pool", "priority"],
            registry=r,
        )
        self.refused_at_once = Counter(
            "sluice_wait_refused_at_once",
            "Requests that could have waited but were refused at once, by reason "
            "(deadline: no room before max_wait; overflow: the wait queue was full).",
            ["pool", "priority", "reason"],
            registry=r,
        )
        self.wakeups = Counter(
            "sluice_wait_wakeups",
            "Wake-ups of a pool's waiters on this instance (one per release message).",
            ["pool"],
            registry=r,
        )


class _Waiter:
    __slots__ = ("plan", "seq", "ticket", "wake")

    def __init__(self, plan: AdmitPlan, ticket: WaitTicket, seq: int) -> None:
        self.plan = plan
        self.ticket = ticket
        self.seq = seq
        self.wake: asyncio.Future[None] | None = None

    def order(self) -> tuple[int, float, int]:
        # The fleet queue's order: rank, then arrival (none yet: behind the others).
        return (self.plan.rank, self.ticket.arrival or math.inf, self.seq)


class WaitRoom:
    """This instance's waiters, per pool; one per store.

    ``attempt(plan, tokens, ticket)`` is one store decision for a waiter (``ticket``
    None: an ordinary admit); ``withdraw(plan, ticket)`` drops the waiter's entries,
    queued; ``prepare(pool)`` (optional) runs before a pool's first wait, so that no
    wake-up published after the first attempt can be missed (a subscription).
    """

    def __init__(
        self,
        attempt: Attempt,
        withdraw: Withdraw,
        *,
        id_prefix: str,
        prepare: Prepare | None = None,
        max_waiters: int = 1000,
        safety_s: float = 2.0,
        metrics: WaitMetrics | None = None,
    ) -> None:
        if max_waiters < 0:
            raise ValueError(f"max_waiters must be >= 0, got {max_waiters}")
        self._attempt = attempt
        self._withdraw = withdraw
        self._prepare = prepare
        self._prefix = id_prefix
        self._max = max_waiters
        self._safety_s = safety_s
        self.metrics = metrics or WaitMetrics()
        self._rooms: dict[str, dict[int, _Waiter]] = {}
        self._seq = itertools.count(1)

    def waiting(self, pool: str) -> int:
        """Requests of ``pool`` inside :meth:`admit_waiting` on this instance."""
        return len(self._rooms.get(pool, ()))

    def pools(self) -> list[str]:
        """Pools with waiters on this instance."""
        return [pool for pool, room in self._rooms.items() if room]

    def wake(self, pool: str) -> None:
        """Let every waiter of ``pool`` try again now, best (rank, arrival) first."""
        room = self._rooms.get(pool)
        if not room:
            return
        # ``pool`` is a scope: a tier with its own quota wakes its own waiters (same label).
        self.metrics.wakeups.labels(pool.partition(TIER_SCOPE)[0]).inc()
        # Futures resolved in this order resume their tasks in this order within one
        # tick, so their attempts reach the store's queue, and the script, in this order.
        for w in sorted(room.values(), key=_Waiter.order):
            if w.wake is not None and not w.wake.done():
                w.wake.set_result(None)

    def wake_all(self) -> None:
        """Wake every pool's waiters (wake-up messages may have been lost)."""
        for pool in self.pools():
            self.wake(pool)

    async def admit_waiting(self, plan: AdmitPlan, tokens: int, max_wait_ms: int) -> Decision:
        """Admit ``plan``, waiting up to ``max_wait_ms`` for room; the last refusal otherwise.

        Refused at once (no wait) when the store says the deadline cannot be met or the
        pool's wait queue on this instance is full. An admitted decision must be settled
        like any other; a refusal leaves nothing behind in the store.
        """
        if max_wait_ms <= 0:
            return await self._attempt(plan, tokens, None)
        room = self._rooms.get(plan.scope)
        if room is None:
            room = self._rooms[plan.scope] = {}
        if len(room) >= self._max:
            self.metrics.refused_at_once.labels(plan.pool, plan.priority, "overflow").inc()
            return await self._attempt(plan, tokens, None)
        if self._prepare is not None:
            await self._prepare(plan.scope)
        seq = next(self._seq)
        waiter = _Waiter(plan, WaitTicket(f"{self._prefix}{seq}", max_wait_ms), seq)
        # In the room before the first attempt: a release during it is not missed.
        room[seq] = waiter
        try:
            return await self._wait(waiter, max_wait_ms / 1000.0, tokens)
        finally:
            del room[seq]
            if waiter.ticket.listed:
                self._withdraw(plan, waiter.ticket)

    async def _wait(self, w: _Waiter, max_wait_s: float, tokens: int) -> Decision:
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + max_wait_s
        labels = (w.plan.pool, w.plan.priority)
        outcome, waited = "cancelled", False
        try:
            while True:
                w.wake = loop.create_future()
                w.ticket.remaining_ms = max(1, math.ceil((deadline - loop.time()) * 1000))
                outcome = "error"
                d = await self._attempt(w.plan, tokens, w.ticket)
                outcome = "cancelled"
                if d.admitted:
                    outcome = "admitted"
                    return d
                if w.ticket.verdict == WAIT_NO:
                    outcome = "refused"
                    if not waited:
                        self.metrics.refused_at_once.labels(*labels, "deadline").inc()
                    return d
                if not waited:
                    waited = True
                    self.metrics.depth.labels(*labels).inc()
                await self._nap(w.wake, deadline - loop.time(), d)
                if loop.time() >= deadline:
                    outcome = "timeout"
                    self.metrics.timeouts.labels(*labels).inc()
                    return d
        finally:
            if waited:
                self.metrics.depth.labels(*labels).dec()
            self.metrics.seconds.labels(*labels, outcome).observe(loop.time() - start)

    async def _nap(self, wake: asyncio.Future[None], left_s: float, d: Decision) -> None:
        """Sleep until woken, the bucket's refill (exact), a safety timer, or the deadline."""
        if d.refused_by in _EXACT_NAMES:
            nap = d.retry_after_ms / 1000.0
        else:
            # Releases publish, so this only covers a lost message or a holder that died
            # without settling (its lease expires); jittered so instances do not align.
            nap = self._safety_s * (0.75 + 0.5 * random.random())
        nap = min(nap, left_s)
        if nap <= 0 or wake.done():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(nap):
                await wake
