"""The in-process store: the same decisions as Redis, for one Sluice instance without Redis.

It runs :mod:`proxy.admission.model` directly on ``time.monotonic()``; settles apply at
once (there is no round trip to save). Only one instance may use it: limits are not
shared across processes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

from proxy.admission.decision import make_decision, snapshot
from proxy.admission.leases import Group, LeaseBook
from proxy.admission.model import (
    QUEUE,
    QUEUE_RETRY_MS,
    WAIT_NO,
    AdmitPlan,
    Decision,
    PoolView,
    effective_limit,
    evaluate,
    retry_ms,
)
from proxy.admission.transitions import Tats, enlist, give_back, grant
from proxy.admission.waiting import WaitMetrics, WaitRoom
from proxy.admission.waitqueue import (
    WaitEntries,
    WaitTicket,
    queue_blocks,
    waiter_score,
)
from proxy.tasks import stop_tasks


def _monotonic_ms() -> float:
    return time.monotonic() * 1000.0


class _Leases:
    """Lease id -> expiry ms, with a lower bound of the earliest expiry to skip most reaps."""

    __slots__ = ("by_id", "earliest")

    def __init__(self) -> None:
        self.by_id: dict[str, float] = {}
        self.earliest = float("inf")

    def reap(self, now: float) -> int:
        if now >= self.earliest:
            self.by_id = {k: v for k, v in self.by_id.items() if v > now}
            self.earliest = min(self.by_id.values(), default=float("inf"))
        return len(self.by_id)

    def add(self, lease: str, expiry: float) -> None:
        self.by_id[lease] = expiry
        self.earliest = min(self.earliest, expiry)


class _Workload:
    __slots__ = ("leases", "rtat", "ttat")

    def __init__(self) -> None:
        self.rtat = self.ttat = 0.0
        self.leases = _Leases()


class _Pool:
    __slots__ = ("dyn", "leases", "rtat", "ttat", "waiters", "workloads", "wseq")

    def __init__(self) -> None:
        self.rtat = self.ttat = 0.0
        self.dyn: int | None = None
        self.leases = _Leases()
        self.workloads: dict[str, _Workload] = {}
        self.waiters = WaitEntries()
        self.wseq = 0  # the pool's waiter sequence (admit.lua: HINCRBY pool wseq)


class EmbeddedStore:
    """:class:`~proxy.admission.protocol.Store` kept in this process's memory."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] | None = None,
        wait_metrics: WaitMetrics | None = None,
        max_waiters: int = 1000,
        wait_safety_s: float = 2.0,
    ) -> None:
        """``clock`` returns milliseconds (monotonic); injectable for tests.

        ``max_waiters`` bounds the requests waiting per pool; ``wait_safety_s`` is the mean
        interval at which a waiter re-checks without a wake-up (see :class:`WaitRoom`).
        """
        self._now = clock or _monotonic_ms
        self._room = WaitRoom(
            self.attempt,
            self.withdraw,
            id_prefix="embedded:w",
            max_waiters=max_waiters,
            safety_s=wait_safety_s,
            metrics=wait_metrics,
        )
        self._pools: dict[str, _Pool] = {}
        self._book = LeaseBook()
        self._seq = itertools.count(1)
        self._heartbeat: asyncio.Task[None] | None = None

    def _pool(self, name: str) -> _Pool:
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = _Pool()
        return pool

    async def start(self) -> None:
        """Start the lease heartbeat."""
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(
                self._book.run_heartbeat(self._extend)
            )

    async def close(self) -> None:
        """Stop the heartbeat."""
        if self._heartbeat is not None:
            await stop_tasks([self._heartbeat], "lease heartbeat")
            self._heartbeat = None

    async def admit(self, plan: AdmitPlan, tokens: int) -> Decision:
        """Decide at once; see :meth:`Store.admit`."""
        return self._decide(plan, tokens, None)

    async def admit_waiting(self, plan: AdmitPlan, tokens: int, max_wait_ms: int) -> Decision:
        """Admit, waiting up to ``max_wait_ms`` for room; see :meth:`Store.admit_waiting`."""
        return await self._room.admit_waiting(plan, tokens, max_wait_ms)

    def waiting(self, pool: str) -> int:
        """Requests of ``pool`` waiting (or attempting) in :meth:`admit_waiting`."""
        return self._room.waiting(pool)

    async def attempt(self, plan: AdmitPlan, tokens: int, ticket: WaitTicket | None) -> Decision:
        """One decision, as one request of ``admit.lua``; ``ticket`` marks a waiter (or None)."""
        return self._decide(plan, tokens, ticket)

    def _decide(self, plan: AdmitPlan, tokens: int, ticket: WaitTicket | None) -> Decision:
        now = self._now()
        pool = self._pool(plan.scope)
        wl = pool.workloads.get(plan.workload)
        if wl is None:
            wl = pool.workloads[plan.workload] = _Workload()
        p = plan.params
        freed = len(pool.leases.by_id) - pool.leases.reap(now)
        view = PoolView(
            pool.rtat,
            pool.ttat,
            len(pool.leases.by_id),
            effective_limit(p.p_conc, pool.dyn),
            wl.rtat,
            wl.ttat,
            wl.leases.reap(now) if p.w_conc >= 0 else 0,
        )
        code, wait = evaluate(p, tokens, now, view, pool.leases.earliest, wl.leases.earliest)
        changed = pool.waiters.reap(now) if code == 0 or ticket is not None else 0
        if code == 0:
            own = waiter_score(plan.rank, 0 if ticket is None else ticket.arrival)
            if queue_blocks(pool.waiters.head(), own, None if ticket is None else ticket.id):
                code, wait = QUEUE, QUEUE_RETRY_MS
        if code:
            retry = retry_ms(wait)
            if ticket is not None:
                changed += self._enlist(pool, plan, ticket, code, retry, now)
            self._after(plan.scope, pool, freed + changed, view.p_in, view.p_limit)
            return make_decision(plan, code, retry, None, snapshot(p, now, view))
        lease = f"embedded:{next(self._seq)}"
        self._grant(pool, wl, plan, tokens, lease, now)
        if ticket is not None:
            changed += pool.waiters.remove(ticket.id)
            ticket.verdict = WAIT_NO
        view = PoolView(
            pool.rtat,
            pool.ttat,
            view.p_in + 1,
            view.p_limit,
            wl.rtat,
            wl.ttat,
            view.w_in + 1 if p.w_conc >= 0 else 0,
        )
        self._after(plan.scope, pool, freed + changed, view.p_in, view.p_limit)
        return make_decision(plan, 0, 0, lease, snapshot(p, now, view))

    @staticmethod
    def _enlist(
        pool: _Pool, plan: AdmitPlan, ticket: WaitTicket, code: int, retry: int, now: float
    ) -> int:
        """Apply a refused waiter's verdict to the pool's wait sets; queue entries it removed."""
        step = enlist(plan.rank, ticket.arrival, ticket.remaining_ms, code, retry, now, pool.wseq)
        ticket.verdict, ticket.arrival, pool.wseq = step.verdict, step.arrival, step.wseq
        if step.verdict == WAIT_NO:
            return int(pool.waiters.remove(ticket.id))
        if step.score is not None:
            pool.waiters.enqueue(ticket.id, step.score, step.expiry)
            return 0
        removed = pool.waiters.unqueue(ticket.id)
        pool.waiters.list_only(ticket.id, step.expiry)
        return int(removed)

    def _grant(
        self, pool: _Pool, wl: _Workload, plan: AdmitPlan, tokens: int, lease: str, now: float
    ) -> None:
        p = plan.params
        tats = grant(p, Tats(pool.rtat, pool.ttat, wl.rtat, wl.ttat), tokens, now)
        pool.rtat, pool.ttat, wl.rtat, wl.ttat = tats
        expiry = now + p.ttl_ms
        pool.leases.add(lease, expiry)
        if p.w_conc >= 0:
            wl.leases.add(lease, expiry)
        self._book.add(plan, lease)

    def _after(self, name: str, pool: _Pool, changed: int, in_flight: int, limit: int) -> None:
        # Like admit.lua's PUBLISH: capacity came back (reaped leases) or the queue's head
        # moved, some of it is left, and someone waits.
        if changed and (limit < 0 or in_flight < limit) and len(pool.waiters):
            self._room.wake(name)

    def withdraw(self, plan: AdmitPlan, ticket: WaitTicket) -> None:
        """Forget a waiter that stopped waiting (gave up, timed out, was cancelled)."""
        pool = self._pool(plan.scope)
        pool.waiters.remove(ticket.id)
        ticket.verdict = WAIT_NO
        if len(pool.waiters):
            self._room.wake(plan.scope)

    def settle(
        self,
        plan: AdmitPlan,
        lease: str,
        reserved_tokens: int,
        actual_tokens: int,
        *,
        confirm: bool = False,
    ) -> None:
        """Apply at once (so there is never anything to confirm); see :meth:`Store.settle`."""
        now = self._now()
        self._book.remove(plan.scope, lease)
        pool = self._pool(plan.scope)
        wl = pool.workloads.get(plan.workload)
        pool.leases.by_id.pop(lease, None)
        w = (wl.rtat, wl.ttat) if wl is not None else (0.0, 0.0)
        tats = Tats(pool.rtat, pool.ttat, *w)
        tats = give_back(plan.params, tats, reserved_tokens - actual_tokens, now)
        pool.rtat, pool.ttat = tats.p_rtat, tats.p_ttat
        if wl is not None:  # a workload never admitted here has no state to change
            wl.leases.by_id.pop(lease, None)
            wl.rtat, wl.ttat = tats.w_rtat, tats.w_ttat
        if len(pool.waiters):
            self._room.wake(plan.scope)  # settle.lua's PUBLISH

    async def flush(self) -> None:
        """Nothing is queued in process."""

    async def ping(self) -> bool:
        """Always ready."""
        return True

    def shed_ahead(self, pool: str) -> None:
        """Nothing to give back: this store decides in-process, with no grant held ahead."""

    async def set_pool_limit(self, pool: str, limit: int | None) -> None:
        """Set or clear the dynamic concurrency limit."""
        self._pool(pool).dyn = limit

    async def holds_lease(self, pool: str, lease: str) -> bool:
        """See :meth:`Store.holds_lease`."""
        expiry = self._pool(pool).leases.by_id.get(lease)
        return expiry is not None and expiry > self._now()

    async def pool_stats(self, pool: str) -> dict[str, float]:
        """See :meth:`Store.pool_stats`."""
        now = self._now()
        p = self._pool(pool)
        return {
            "in_flight": float(p.leases.reap(now)),
            "dynamic_limit": float(-1 if p.dyn is None else p.dyn),
            "held_here": float(self._book.count(pool)),
        }

    async def _extend(self, pool_name: str, groups: list[Group]) -> None:
        now = self._now()
        pool = self._pool(pool_name)
        for plan, leases in groups:
            expiry = now + plan.lease_ttl_ms
            wl = pool.workloads.get(plan.workload)
            for lease in leases:
                # Like ZADD XX: only leases still present are pushed back.
                if lease in pool.leases.by_id:
                    pool.leases.by_id[lease] = expiry
                if wl is not None and lease in wl.leases.by_id:
                    wl.leases.by_id[lease] = expiry
