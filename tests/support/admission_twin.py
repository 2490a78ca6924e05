"""The pure model of admission as a store: every state change is one pure function.

:func:`~proxy.admission.model.evaluate` decides, :func:`~proxy.admission.transitions.grant`,
:func:`~.give_back` and :func:`~.enlist` say what changes, and this folds them over a
sequence of calls on a frozen clock. It shares no code with the embedded store beyond
those functions, so agreeing with it (and with Redis) checks the stores, not the model.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

from proxy.admission.decision import make_decision, snapshot
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
from proxy.admission.waitqueue import WaitEntries, WaitTicket, queue_blocks, waiter_score

#: The twin's clock (ms): fixed, so its TATs are exact.
NOW = 1_000_000.0


class TwinStore:
    """Admission state as plain dicts; the store methods the agreement tests call."""

    def __init__(self) -> None:
        self.tats: dict[tuple[str, str], Tats] = defaultdict(lambda: Tats(0.0, 0.0, 0.0, 0.0))
        self.pool_tats: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
        self.leases: dict[str, set[str]] = defaultdict(set)
        self.wl_leases: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.waiters: dict[str, WaitEntries] = defaultdict(WaitEntries)
        self.wseq: dict[str, int] = defaultdict(int)
        self._seq = itertools.count(1)

    def _tats(self, plan: AdmitPlan) -> Tats:
        w = self.tats[plan.scope, plan.workload]
        return w._replace(
            p_rtat=self.pool_tats[plan.scope][0], p_ttat=self.pool_tats[plan.scope][1]
        )

    def _store(self, plan: AdmitPlan, tats: Tats) -> None:
        self.tats[plan.scope, plan.workload] = tats
        self.pool_tats[plan.scope] = (tats.p_rtat, tats.p_ttat)

    def _view(self, plan: AdmitPlan, tats: Tats) -> PoolView:
        p = plan.params
        w_in = len(self.wl_leases[plan.scope, plan.workload]) if p.w_conc >= 0 else 0
        limit = effective_limit(p.p_conc, None)
        return PoolView(
            tats.p_rtat,
            tats.p_ttat,
            len(self.leases[plan.scope]),
            limit,
            tats.w_rtat,
            tats.w_ttat,
            w_in,
        )

    async def attempt(self, plan: AdmitPlan, tokens: int, ticket: WaitTicket | None) -> Decision:
        """One decision, as one request of admit.lua."""
        p, tats = plan.params, self._tats(plan)
        view = self._view(plan, tats)
        # Every lease is granted at NOW with the plan's TTL: the earliest expiry is that.
        p_first = NOW + p.ttl_ms if self.leases[plan.scope] else None
        w_first = NOW + p.ttl_ms if self.wl_leases[plan.scope, plan.workload] else None
        code, wait = evaluate(p, tokens, NOW, view, p_first, w_first)
        waiters = self.waiters[plan.scope]
        if code == 0:
            own = waiter_score(plan.rank, 0 if ticket is None else ticket.arrival)
            if queue_blocks(waiters.head(), own, None if ticket is None else ticket.id):
                code, wait = QUEUE, QUEUE_RETRY_MS
        if code:
            retry = retry_ms(wait)
            if ticket is not None:
                self._enlist(plan, ticket, code, retry)
            return make_decision(plan, code, retry, None, snapshot(p, NOW, view))
        lease = f"twin:{next(self._seq)}"
        tats = grant(p, tats, tokens, NOW)
        self._store(plan, tats)
        self.leases[plan.scope].add(lease)
        if p.w_conc >= 0:
            self.wl_leases[plan.scope, plan.workload].add(lease)
        if ticket is not None:
            waiters.remove(ticket.id)
            ticket.verdict = WAIT_NO
        return make_decision(plan, 0, 0, lease, snapshot(p, NOW, self._view(plan, tats)))

    async def admit(self, plan: AdmitPlan, tokens: int) -> Decision:
        """A plain admit (not a waiter)."""
        return await self.attempt(plan, tokens, None)

    def _enlist(self, plan: AdmitPlan, ticket: WaitTicket, code: int, retry: int) -> None:
        waiters, scope = self.waiters[plan.scope], plan.scope
        step = enlist(
            plan.rank, ticket.arrival, ticket.remaining_ms, code, retry, NOW, self.wseq[scope]
        )
        ticket.verdict, ticket.arrival, self.wseq[scope] = step.verdict, step.arrival, step.wseq
        if step.verdict == WAIT_NO:
            waiters.remove(ticket.id)
        elif step.score is not None:
            waiters.enqueue(ticket.id, step.score, step.expiry)
        else:
            waiters.unqueue(ticket.id)
            waiters.list_only(ticket.id, step.expiry)

    def settle(self, plan: AdmitPlan, lease: str, reserved_tokens: int, actual_tokens: int) -> None:
        """settle.lua: the lease goes, unused tokens come back."""
        self.leases[plan.scope].discard(lease)
        self.wl_leases[plan.scope, plan.workload].discard(lease)
        self._store(
            plan, give_back(plan.params, self._tats(plan), reserved_tokens - actual_tokens, NOW)
        )

    def withdraw(self, plan: AdmitPlan, ticket: WaitTicket) -> None:
        """A waiter gave up: its entries go."""
        self.waiters[plan.scope].remove(ticket.id)
        ticket.verdict = WAIT_NO

    async def flush(self) -> None:
        """Nothing is ever queued."""
