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

Settled usage is priced per tier (``models.<pool>.prices``) into ``sluice_cost_usd``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from proxy.admission import AdmitPlan
from proxy.admission.estimate import reservation
from proxy.admission.gate import Gate, Ticket
from proxy.config import TierPrice
from proxy.errors import BedrockError
from proxy.metrics import Metrics
from proxy.pipeline.identify import Caller
from proxy.pipeline.retry import MIN_CALL_S
from proxy.pipeline.tiers import TierChoice, TierTable, escalation
from proxy.policy import CompiledPolicy, PoolInfo
from proxy.usage import Usage

__all__ = ["TierQuotas"]


class Admitted(Protocol):
    """What :meth:`TierQuotas.move` reads and updates of a call (the handler's ``Call``)."""

    caller: Caller | None
    pool: PoolInfo | None
    ticket: Ticket | None
    usage: Usage
    tier: TierChoice | None


class TierQuotas:
    """Tier choice before admission, tier quotas on fallback, tier prices at settlement."""

    def __init__(self, policy: CompiledPolicy, gate: Gate, metrics: Metrics) -> None:
        self.policy = policy
        self.gate = gate
        self.metrics = metrics
        self.table = TierTable(policy.policy)
        self._prices: dict[tuple[str, str], TierPrice] = {
            (name, tier): price
            for name, pool in policy.policy.models.items()
            for tier, price in pool.prices.items()
        }

    def choose(
        self,
        operation: str,
        caller: Caller,
        pool: PoolInfo,
        headers: Mapping[str, str],
        body: bytes,
        *,
        shared: bool = False,
    ) -> TierChoice | None:
        """The tier a call will be sent on (None: an operation without tiers).

        ``shared``: the call is admitted on ``pool``'s own quota whatever its tier (a
        downgrade to that pool), so a tier with a quota of its own becomes ``default``.
        """
        choice = self.table.for_call(
            operation, caller.workload.name, caller.priority, pool.name, headers, body
        )
        if not shared or choice is None or self.policy.quota_tier(pool.name, choice.tier) is None:
            return choice
        return TierChoice(
            "default", None if choice.on_throttle == "default" else choice.on_throttle
        )

    def plan(
        self, caller: Caller, pool: PoolInfo, cap: int | None, choice: TierChoice | None
    ) -> AdmitPlan:
        """The plan admitting a call on its tier's quota (the pool's, unless the tier has one)."""
        tier = None if choice is None else choice.tier
        return self.policy.plan(caller.workload, pool, caller.priority, cap, tier)

    async def admit(self, call: Admitted, plan: AdmitPlan, tokens: int, max_wait_ms: int) -> Ticket:
        """Admit ``call`` on ``plan`` (its tier's quota) or raise the refusal to answer with.

        When that quota refuses and the policy names a fallback tier (``tier_on_throttle``)
        with another quota, the call is admitted there instead and will be sent on that
        tier: Sluice's quota stands for Bedrock's, so this is the throttle-then-fallback of
        :func:`~proxy.pipeline.tiers.escalation` without the wasted call.
        """
        caller, pool, choice = call.caller, call.pool, call.tier
        assert caller is not None and pool is not None
        gate = self.gate
        try:
            return await gate.admit(
                caller.workload, caller.priority, pool, plan, tokens, max_wait_ms=max_wait_ms
            )
        except BedrockError as exc:
            if exc.status != 429 or choice is None:
                raise
            better = escalation(choice, 429, "ThrottlingException")
            if better is None:
                raise
            other = self.plan(caller, pool, plan.workload_concurrency, better)
            if other.scope == plan.scope:
                raise
            try:
                ticket = await gate.admit(caller.workload, caller.priority, pool, other, tokens)
            except BedrockError:
                self.metrics.tier_fallbacks_refused.labels(pool.name, str(better.tier)).inc()
                raise exc from None
        before = choice.tier or "default"
        self.metrics.tier_fallbacks.labels(pool.name, before, str(better.tier)).inc()
        call.tier = better
        return ticket

    async def escalate(
        self, call: Admitted, status: int, error_type: str | None, remaining_s: float
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

    async def move(self, call: Admitted, to: TierChoice) -> bool:
        """True when ``call`` may be sent on ``to.tier``; admits it there when that tier's
        quota is another than the one the call holds (``call.ticket`` is then replaced and
        the old slot given back as throttled, with nothing charged: Bedrock charged nothing).
        """
        caller, pool, old = call.caller, call.pool, call.ticket
        if caller is None or pool is None:
            return True
        # The held plan's workload concurrency already carries the schedule's cap, and a
        # workload's limits are the same on every tier: re-capping with it changes nothing.
        cap = None if old is None else old.plan.workload_concurrency
        plan = self.plan(caller, pool, cap, to)
        if old is not None and old.plan.scope == plan.scope:
            return True
        if old is None and self.policy.unmetered(plan):
            return True
        tokens = (
            old.reserved_tokens
            if old is not None and old.reserved_tokens
            else reservation(call.usage.input_tokens, pool.default_max_tokens, pool.output_weight)
        )
        try:
            ticket = await self.gate.admit(caller.workload, caller.priority, pool, plan, tokens)
        except BedrockError:
            self.metrics.tier_fallbacks_refused.labels(pool.name, str(to.tier)).inc()
            return False
        if old is None:
            self.metrics.in_flight_of(pool.name).inc()  # the handler's settle decrements it
        else:
            self.gate.settle(old, 0, throttled=True, latency_ms=0.0)
        call.ticket = ticket
        return True

    def on_pool_quota(self, call: Admitted) -> bool:
        """False when the call ran on a tier with a quota of its own.

        Bedrock's throttles of such a call (flex is throttled first, by design) say nothing
        about the pool's own quota, so the pool's breaker and adaptive limit must not count
        them: a batch flooding flex must not open the breaker that P0 goes through.
        """
        tier = None if call.tier is None else call.tier.tier
        return call.pool is None or self.policy.quota_tier(call.pool.name, tier) is None

    def charge(self, workload: str, pool: str, tier: str | None, usage: Usage) -> None:
        """Count a call's settled usage at its served tier's price (if the pool prices it)."""
        if tier is None or not usage.known:
            return
        price = self._prices.get((pool, tier))
        if price is None:
            return
        cost = (
            usage.input_tokens * price.input_per_million
            + usage.output_tokens * price.output_per_million
        ) / 1e6
        if cost > 0:
            self.metrics.cost_of(workload, pool, tier).inc(cost)
