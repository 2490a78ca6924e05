"""Service tiers at admission and settlement: each tier's own quota, and its price.

Bedrock accounts tiers separately, so a pool may give a tier its own quota
(``models.<pool>.tiers.<tier>``): a call is admitted against the quota of the tier it
will be sent on, which is why the tier is chosen *before* admission (:meth:`choose`).
The plan of such a tier is an ordinary plan whose pool limits live in their own scope
(``sluice:{<pool>}:tier:<tier>``, the pool's hash tag), so one admit script still
decides every limit of the call atomically, on the embedded store and on Redis alike.
The scope holds the workload limits too (they are fields of the scope's hash in
``admit.lua``), so a workload's own limits on a pool hold in each quota scope apart.

A call Bedrock throttles on its tier may move to the policy's fallback tier
(:func:`proxy.pipeline.tiers.escalation`); when that tier has a quota of its own, the move
is admitted against it first (:meth:`TierQuotas.move`) and the throttled attempt's slot is
given back. A fallback the tier's quota refuses is not made: the call is retried (or
refused) on its own tier as any throttled call.

Everything is read from the policy the call is decided under (``call.policy``), so a
hot reload applies to the next call. Settled usage is priced per tier
(``models.<pool>.prices``) into ``sluice_cost_usd`` (:func:`charge`).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import cast

from proxy.admission import AdmitPlan
from proxy.admission.estimate import RequestEstimate, estimate
from proxy.admission.fit import reserve
from proxy.admission.gate import Gate, Ticket
from proxy.config import TierPrice
from proxy.errors import BedrockError
from proxy.metrics import Metrics
from proxy.pipeline.call import Call
from proxy.pipeline.retry import MIN_CALL_S
from proxy.pipeline.tiers import (
    NO_TIER,
    TIERED_OPERATIONS,
    TierChoice,
    TierTable,
    caller_tier,
    escalation,
)
from proxy.policy import PoolInfo

__all__ = ["TierQuotas", "charge", "on_pool_quota"]


class TierQuotas:
    """Tier choice before admission, and tier quotas on fallback (at admission or mid-call)."""

    def __init__(self, gate: Gate, metrics: Metrics) -> None:
        self.gate = gate
        self.metrics = metrics
        # The tier table of the policy last seen (its cache is per policy): rebuilt when
        # a reload swaps the policy, so each call is decided under its own.
        self._table: TierTable | None = None

    def choose(self, call: Call, pool: PoolInfo, *, shared: bool = False) -> TierChoice | None:
        """The tier ``call`` will be sent on to ``pool`` (None: an operation without tiers).

        ``shared``: the call is admitted on ``pool``'s own quota whatever its tier (a
        downgrade to that pool), so a tier with a quota of its own becomes ``default``.
        """
        caller, route = call.caller, call.route
        assert caller is not None and route is not None
        table = self._table
        if table is None or table.policy is not call.policy.policy:
            table = self._table = TierTable(call.policy.policy)
        if pool.name in table.untiered:  # the usual case, without for_call's key and look-up
            operation = route.operation
            if operation not in TIERED_OPERATIONS:
                return None
            if caller_tier(operation, call.headers or {}, call.body) is None:
                return NO_TIER  # (tier None: never a quota of its own, shared or not)
        choice = table.for_call(
            route.operation,
            caller.workload.name,
            caller.priority,
            pool.name,
            call.headers or {},
            call.body,
        )
        if not shared or choice is None or call.policy.quota_tier(pool.name, choice.tier) is None:
            return choice
        return TierChoice(
            "default", None if choice.on_throttle == "default" else choice.on_throttle
        )

    @staticmethod
    def plan(call: Call, pool: PoolInfo, cap: int | None, choice: TierChoice | None) -> AdmitPlan:
        """The plan admitting a call on its tier's quota (the pool's, unless the tier has one)."""
        caller = call.caller
        assert caller is not None
        tier = None if choice is None else choice.tier
        return call.policy.plan(caller.workload, pool, caller.priority, cap, tier)

    def admit(
        self, call: Call, plan: AdmitPlan, tokens: int, est: RequestEstimate, max_wait_ms: int
    ) -> Awaitable[Ticket | BedrockError]:
        """Admit ``call`` on ``plan`` (its tier's quota), or return the refusal to answer with.

        When that quota refuses and the policy names a fallback tier (``tier_on_throttle``)
        with another quota, the call is admitted there instead and will be sent on that
        tier: Sluice's quota stands for Bedrock's, so this is the throttle-then-fallback of
        :func:`~proxy.pipeline.tiers.escalation` without the wasted call. Without a fallback
        tier this is the gate's own coroutine: no frame of ours on its every resumption.
        """
        caller, pool, choice = call.caller, call.pool, call.tier
        assert caller is not None and pool is not None
        got = self.gate.admit(
            caller.workload, caller.priority, pool, plan, tokens, max_wait_ms=max_wait_ms
        )
        if choice is None or choice.on_throttle is None:
            return got  # escalation() could give nothing to fall back on
        return self._or_fallback(call, plan, got, est, choice)

    async def _or_fallback(
        self,
        call: Call,
        plan: AdmitPlan,
        admitting: Awaitable[Ticket | BedrockError],
        est: RequestEstimate,
        choice: TierChoice,
    ) -> Ticket | BedrockError:
        got = await admitting
        pool = call.pool
        assert pool is not None
        if not isinstance(got, BedrockError) or got.status != 429:
            return got
        better = escalation(choice, 429, "ThrottlingException")
        if better is None:
            return got
        other = self.plan(call, pool, plan.workload_concurrency, better)
        if other.scope == plan.scope:
            return got
        ticket = await self._admit_on(call, pool, other, est, better)
        if ticket is None:
            return got
        self.metrics.tier_fallbacks.labels(
            pool.name, choice.tier or "default", str(better.tier)
        ).inc()
        call.tier = better
        return ticket

    async def escalate(
        self, call: Call, status: int, error_type: str | None, remaining_s: float
    ) -> bool:
        """True when a call Bedrock answered ``status`` goes again at once on the fallback tier.

        Only after a throttle on a tier with a fallback, with more than a call's worth of the
        deadline left, and once the fallback tier's quota admits it (:meth:`move`).
        """
        better = escalation(call.tier, status, error_type)
        if better is None or remaining_s <= MIN_CALL_S or not await self.move(call, better):
            return False
        before = (call.tier.tier if call.tier else None) or "default"
        pool = call.pool.name if call.pool else "-"
        self.metrics.tier_fallbacks.labels(pool, before, str(better.tier)).inc()
        call.tier = better
        return True

    async def move(self, call: Call, to: TierChoice) -> bool:
        """True when ``call`` may be sent on ``to.tier``; admits it there when that tier's
        quota is another than the one the call holds. ``call.ticket`` is then replaced (the
        call owns the new grant from the step it is returned) and the old one given back
        once, with nothing charged: Bedrock charged nothing for the throttled attempt.
        """
        caller, pool, old, route = call.caller, call.pool, call.ticket, call.route
        if caller is None or pool is None or route is None:
            return True
        # The held plan's workload concurrency already carries the schedule's cap, and a
        # workload's limits are the same on every tier: re-capping with it changes nothing.
        cap = None if old is None else old.plan.workload_concurrency
        plan = self.plan(call, pool, cap, to)
        if old is not None and old.plan.scope == plan.scope:
            return True
        if old is None and call.policy.unmetered(plan):
            return True
        try:
            est = estimate(route.operation, call.body)  # rare path: the body is parsed again
        except BedrockError:
            return False
        ticket = await self._admit_on(call, pool, plan, est, to)
        if ticket is None:
            return False
        call.ticket = ticket
        if old is None:
            self.metrics.in_flight_of(pool.name).inc()  # the settle stage decrements it
        else:
            self.gate.settle(old, 0)  # once: Ticket.released; the settle stage frees the new one
        return True

    async def _admit_on(
        self, call: Call, pool: PoolInfo, plan: AdmitPlan, est: RequestEstimate, to: TierChoice
    ) -> Ticket | None:
        """A grant on the fallback tier's quota at once (no waiting), or None (counted)."""
        caller = call.caller
        assert caller is not None
        try:
            tokens = reserve(plan, pool, call.usage.input_tokens or est.input_tokens, est)
        except BedrockError:
            got: Ticket | BedrockError | None = None  # that quota could never hold it
        else:
            got = await self.gate.admit(caller.workload, caller.priority, pool, plan, tokens)
        if isinstance(got, Ticket):
            return got
        self.metrics.tier_fallbacks_refused.labels(pool.name, str(to.tier)).inc()
        return None


def on_pool_quota(call: Call) -> bool:
    """False when the call runs on a tier with a quota of its own.

    Bedrock's throttles of such a call (flex is throttled first, by design) say nothing
    about the pool's own quota, so the pool's breaker and adaptive limit must not count
    them: a batch flooding flex must not open the breaker that P0 goes through.
    """
    tier = None if call.tier is None else call.tier.tier
    return call.pool is None or call.policy.quota_tier(call.pool.name, tier) is None


def charge(metrics: Metrics, call: Call, workload: str, pool: str) -> None:
    """Count a call's settled usage at its served tier's price (if the pool prices it)."""
    tier, usage = call.served_tier, call.usage
    pool_cfg = call.policy.policy.models.get(pool)
    if tier is None or not usage.known or pool_cfg is None or not pool_cfg.prices:
        return  # (the usual case: no prices, and no typing.cast call made per request)
    price = cast("dict[str, TierPrice]", pool_cfg.prices).get(tier)
    if price is None:
        return
    cost = (
        usage.input_tokens * price.input_per_million
        + usage.output_tokens * price.output_per_million
    ) / 1e6
    if cost > 0:
        metrics.cost_of(workload, pool, tier).inc(cost)
