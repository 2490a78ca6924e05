"""Admission for batch records: the same decision a live call of the workload gets.

Pauses, time-of-day schedules, breakers and the store's buckets, shares and leases
apply to a record exactly as to a live call of its workload and class. A refusal is
never an error here: the record waits in the queue and the worker asks again after
the refusal's ``retry_after_ms`` (with jitter, so a fleet of workers does not ask in
lockstep). Batch records always fail closed when the store is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from proxy.admission import AdmitPlan, Store, StoreUnavailable
from proxy.control.controller import Adaptivity
from proxy.metrics import Metrics
from proxy.pipeline.schedule import cap_at
from proxy.pipeline.tiers import TierTable
from proxy.policy import CompiledPolicy, PolicyRef, PoolInfo, WorkloadInfo

log = logging.getLogger("sluice.jobs")
#: How often a priority hold is looked at again (it ends within ticks of the last throttle).
HOLD_RECHECK_S = 0.5
#: How often a paused workload or an open breaker is looked at again.
RECHECK_S = 1.0
#: Longest a worker sleeps on one refusal (a schedule window may last hours).
MAX_WAIT_S = 30.0
_STORE_DOWN_S = 1.0


@dataclass(slots=True)
class Grant:
    """An admitted record: what to settle when its call ends (no lease when unmetered)."""

    plan: AdmitPlan
    lease: str | None
    reserved: int
    #: The service tier to send the record on (None: as written), chosen as for a live call.
    tier: str | None = None


class RecordAdmission:
    """Asks admission for one record at a time and waits (never errors) until it says yes."""

    def __init__(
        self,
        policy: PolicyRef,
        store: Store,
        metrics: Metrics,
        adaptivity: Callable[[], Adaptivity | None],
    ) -> None:
        self._policy = policy
        self.store = store
        self.metrics = metrics
        self._adaptivity = adaptivity
        self._rng = random.Random()
        self._table: TierTable | None = None

    def _tier(self, workload: WorkloadInfo, pool: PoolInfo) -> str | None:
        """The tier a live call of ``workload`` (asking for none) would be sent on to ``pool``."""
        table = self._table
        if table is None or table.policy is not self.policy.policy:
            table = self._table = TierTable(self.policy.policy)
        return table.choose(workload.name, workload.priority, pool.name, None).tier

    @property
    def policy(self) -> CompiledPolicy:
        """The policy in force (hot reload swaps it; each record reads it when admitted)."""
        return self._policy.current

    @property
    def adaptivity(self) -> Adaptivity | None:
        """The controllers in force (rebuilt when a reload changes their part of the policy)."""
        return self._adaptivity()

    def _blocked_for(self, workload: WorkloadInfo, pool: PoolInfo) -> tuple[float, int | None]:
        """Seconds to wait before asking the store (0: ask now), and the scheduled cap."""
        if self.adaptivity is not None and self.adaptivity.paused(workload.name):
            return self._held_back(workload, "-", "paused", RECHECK_S), None
        schedule = self.policy.policy.workloads[workload.name].schedule
        cap = cap_at(schedule, datetime.now(UTC)) if schedule is not None else None
        if cap is not None and cap.concurrency == 0:
            wait_s = min(cap.seconds_left, MAX_WAIT_S)
            return self._held_back(workload, "-", "schedule", wait_s), None
        a = self.adaptivity
        if a is not None and a.held_by(pool.name, workload.priority) is not None:
            # A higher class is being throttled here: records wait in the queue meanwhile
            # (asked before the breaker, whose half-open True is a probe slot taken).
            return self._held_back(workload, pool.name, "priority_hold", HOLD_RECHECK_S), None
        if a is not None and not a.breaker_allows(pool.name):
            return self._held_back(workload, pool.name, "breaker", RECHECK_S), None
        return 0.0, cap.concurrency if cap is not None else None

    def _held_back(self, workload: WorkloadInfo, pool: str, why: str, wait_s: float) -> float:
        # Counted like the live path counts its pause/schedule refusals.
        self.metrics.refused.labels(workload.name, pool, workload.priority, why).inc()
        return wait_s

    async def try_admit(self, workload: WorkloadInfo, pool: PoolInfo, tokens: int) -> Grant | float:
        """A grant, or the seconds to wait before asking again."""
        wait_s, cap = self._blocked_for(workload, pool)
        if wait_s > 0:
            return wait_s
        # Admitted on the quota of the tier it will be sent on, as a live call of its class.
        tier = self._tier(workload, pool)
        plan = self.policy.plan(workload, pool, workload.priority, cap, tier)
        if self.policy.unmetered(plan):
            return Grant(plan, None, 0, tier)
        try:
            decision = await self.store.admit(plan, tokens)
        except StoreUnavailable as exc:
            self.metrics.store_errors.labels("admit").inc()
            log.warning("store unavailable; batch records wait: %s", exc)
            return _STORE_DOWN_S
        if not decision.admitted:
            limit = decision.refused_by or "unknown"
            self.metrics.refused.labels(workload.name, pool.name, workload.priority, limit).inc()
            base = max(0.05, decision.retry_after_ms / 1000)
            return min(MAX_WAIT_S, base * self._rng.uniform(1.0, 1.5))
        self.metrics.admitted_of(workload.name, pool.name, workload.priority).inc()
        self.metrics.reserved_of(workload.name, pool.name).inc(tokens)
        return Grant(plan, decision.lease, tokens, tier)

    async def admit(self, workload: WorkloadInfo, pool: PoolInfo, tokens: int) -> Grant:
        """Wait until admission says yes."""
        while True:
            got = await self.try_admit(workload, pool, tokens)
            if isinstance(got, Grant):
                return got
            await asyncio.sleep(got)

    def settle(self, grant: Grant, actual: int) -> None:
        """Release the lease and settle real usage (queued by the store)."""
        plan = grant.plan
        self.metrics.settled_of(plan.workload, plan.pool).inc(actual)
        if grant.lease is None:
            return
        self.store.settle(plan, grant.lease, grant.reserved, actual)

    def observe(
        self,
        pool: str,
        priority: str,
        latency_ms: float,
        status: int,
        *,
        on_pool: bool = True,
        lease: str | None = None,
    ) -> None:
        """Feed the adaptive controller and the breaker, as live calls do (throttles on a
        tier with a quota of its own, ``on_pool`` False, are not the pool's; ``lease``: the
        record's pool lease, for the throttle reflex)."""
        if status == 429:  # Bedrock pushes back: no grant may sit held ahead on the pool
            self.store.shed_ahead(pool)
        if self.adaptivity is not None:
            self.adaptivity.observe_status(
                pool, priority, latency_ms, status, on_pool=on_pool, lease=lease
            )
