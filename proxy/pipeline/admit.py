"""The admit stage: budget → schedule → breaker → gate → degrade, as one decision.

Returns :data:`~proxy.pipeline.call.ADMITTED`, a :data:`~proxy.pipeline.call.Degraded`
step or :class:`~proxy.pipeline.call.Refused`; it never raises an HTTP error. A grant
is stored on the call (its owner) in the same step the store hands it over, so a
cancellation at any later point finds it there and the settle stage releases it.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from proxy.admission import AdmitPlan
from proxy.admission.estimate import RequestEstimate, estimate, parse_body
from proxy.admission.fit import reserve
from proxy.admission.gate import Gate, retry_headers
from proxy.control.controller import Adaptivity
from proxy.errors import BedrockError
from proxy.metrics import Metrics
from proxy.pipeline.budget import enforce_budget, upstream_timeout
from proxy.pipeline.cache import ResponseCache
from proxy.pipeline.call import ADMITTED, Admitted, Call, Degraded, Refused
from proxy.pipeline.degrade import DegradeAsk, Degrader, Downgrade
from proxy.pipeline.forward import UPSTREAM_RETRY_AFTER_MS
from proxy.pipeline.hold import Held, hold_back
from proxy.pipeline.identify import Caller
from proxy.pipeline.schedule import cap_at, describe_next_change
from proxy.pipeline.tier_quota import TierQuotas, on_pool_quota
from proxy.policy import CompiledPolicy, PoolInfo, WorkloadInfo
from proxy.routes import MeteredRoute, Route

#: Retry-After for a paused workload: the pause is re-evaluated every tick.
PAUSE_RETRY_S = 5


class Admission:
    """Decides whether a metered call may go now, and on which pool."""

    def __init__(
        self, gate: Gate, cache: ResponseCache, metrics: Metrics, adaptivity: Adaptivity | None
    ) -> None:
        self.gate = gate
        self.metrics = metrics
        self.adaptivity = adaptivity
        self.degrader = Degrader(gate, cache, metrics, self.breaker_allows, self.downgrade_held)
        self.tiers = TierQuotas(gate, metrics)

    def breaker_allows(self, pool: str) -> bool:
        """False while ``pool``'s breaker is open (half-open: True takes a probe slot)."""
        return self.adaptivity is None or self.adaptivity.breaker_allows(pool)

    def downgrade_held(self, pool: str, priority: str) -> bool:
        """True while Bedrock throttles a class above ``priority`` on ``pool``."""
        a = self.adaptivity
        return a is not None and a.downgrade_held_by(pool, priority) is not None

    async def admit(
        self, call: Call, route: MeteredRoute, caller: Caller
    ) -> Admitted | Degraded | Refused:
        """One admission decision for ``call``; errors of the helpers become :class:`Refused`."""
        try:  # (one coroutine, not a wrapper around another: a frame less per request)
            policy = call.policy
            pool = call.pool = policy.resolve_pool(route.model_id)
            workload = caller.workload
            wl_cfg = policy.policy.workloads[workload.name]
            cap = self._cap(policy, workload, pool)
            if isinstance(cap, BedrockError):
                return Refused(cap)
            # The tier first: a tier with a quota of its own is admitted against that quota.
            choice = call.tier = self.tiers.choose(call, pool)
            tier = None if choice is None else choice.tier
            plan = policy.plan(workload, pool, caller.priority, cap, tier)
            unmetered = plan.unmetered  # (fixed when the plan is built: no call)
            blocked, held, wait_ms = self._blocked(policy, pool, caller)
            if held is not None:  # a class without a chain waits for the hold to end
                chain, m = bool(wl_cfg.degrade), self.metrics
                blocked, wait_ms = await hold_back(held, pool, caller, wait_ms, chain, m)
            if (
                unmetered
                and blocked is None
                and wl_cfg.input_budget is None
                and policy.policy.server.upstream_timeout is None
            ):
                # Nothing needs an estimate: no JSON walk (real usage comes in the answer).
                parse_body(call.body)
                return ADMITTED
            est = self._estimate(call, route, workload)
            if blocked is not None:
                refused = blocked
                if not wl_cfg.degrade:
                    return Refused(refused)
            elif unmetered:
                return ADMITTED
            else:
                got = await self._take(call, caller, pool, plan, est, wait_ms)
                if got is None:
                    return ADMITTED
                self._demand(call, got)
                if got.status != 429 or not wl_cfg.degrade:
                    return Refused(got)
                refused = got
            tokens = call.usage.input_tokens
            ask = DegradeAsk(policy, route, caller, pool, est, tokens, call.body, cap, call.headers)
            return self._degraded(call, await self.degrader.degrade(ask), refused)
        except BedrockError as exc:  # unknown model, malformed body, input budget
            return Refused(exc)

    def _blocked(
        self, policy: CompiledPolicy, pool: PoolInfo, caller: Caller
    ) -> tuple[BedrockError | None, Held | None, int]:
        """The open breaker's refusal, or the priority hold on the caller's class; and the
        wait the caller allows for a grant."""
        wait_ms = policy.policy.workloads[caller.workload.name].max_wait_ms
        a = self.adaptivity
        if a is None:
            return None, None, wait_ms
        # The hold first: it has no side effect, while a half-open breaker's True is a
        # probe slot taken, which a held call would then never use.
        held = self._held(pool, caller)
        if held is not None:
            return None, held, wait_ms
        if not a.breaker_allows(pool.name):
            return self._breaker_open(policy, pool), None, wait_ms
        return None, None, wait_ms

    def _held(self, pool: PoolInfo, caller: Caller) -> Held | None:
        """The priority hold on the caller's class on ``pool``, if one is on."""
        a = self.adaptivity
        holder = None if a is None else a.held_by(pool.name, caller.priority)
        return None if a is None or holder is None else Held(a, holder)

    async def _take(
        self,
        call: Call,
        caller: Caller,
        pool: PoolInfo,
        plan: AdmitPlan,
        est: RequestEstimate,
        max_wait_ms: int | None = None,
    ) -> BedrockError | None:
        """Ask the gate for a grant; the call owns it from the step the gate returns it.
        ``max_wait_ms`` defaults to the workload's."""
        try:
            tokens = reserve(plan, pool, call.usage.input_tokens, est)  # capped at the pool's max
        except BedrockError as exc:
            return exc  # an output cap no limit could ever hold: 400, never a lockout
        if max_wait_ms is None:
            max_wait_ms = call.policy.policy.workloads[caller.workload.name].max_wait_ms
        got = await self.tiers.admit(call, plan, tokens, est, max_wait_ms)
        if isinstance(got, BedrockError):
            return got
        call.ticket = got
        self.metrics.in_flight_of(pool.name).inc()
        return None

    def _demand(self, call: Call, refused: BedrockError) -> None:
        """A refusal more pool concurrency would have admitted is demand the controller sees
        (not one of a tier with its own quota: that says nothing about the pool's)."""
        if self.adaptivity is not None and call.pool is not None and on_pool_quota(call):
            priority = call.caller.priority if call.caller else "-"
            self.adaptivity.refused(call.pool.name, priority, refused)

    async def readmit(self, call: Call, max_wait_ms: int) -> BedrockError | None:
        """Queue a call Bedrock throttled (its grant released) for a slot again, in priority
        order under the pool's current limit, waiting up to ``max_wait_ms``; None: granted
        (the new grant is on the call), else the refusal."""
        pool, caller, route = call.pool, call.caller, call.route
        assert pool is not None and caller is not None and route is not None
        try:
            cap = self._cap(call.policy, caller.workload, pool)  # paused, scheduled
            if isinstance(cap, BedrockError):
                return cap
            est = estimate(route.operation, call.body)
        except BedrockError as exc:
            return exc
        held = self._held(pool, caller)
        if held is not None:
            blocked, max_wait_ms = await hold_back(
                held, pool, caller, max_wait_ms, False, self.metrics
            )
            if blocked is not None:
                return blocked
        plan = self.tiers.plan(call, pool, cap, call.tier)
        # The first grant paid the call's request, and its tokens settle when it ends: ask
        # for a slot only, so a retry never costs the caller's requests/min twice.
        slot = replace(plan, pool_requests=None, pool_tokens=None,
                       workload_requests=None, workload_tokens=None,
                       hold_ahead=False)  # fmt: skip
        got = await self._take(call, caller, pool, slot, est, max_wait_ms)
        if got is not None:
            self._demand(call, got)
        elif call.ticket is not None and call.ticket.plan is slot:
            # Settled on the full plan: the tokens used are charged there (none reserved).
            call.ticket.plan, call.ticket.reserved_tokens = plan, 0
        return got

    async def after_throttle(
        self, call: Call, route: MeteredRoute, caller: Caller
    ) -> Degraded | Refused:
        """A Bedrock throttle that survived retries sends a class with a chain down it.

        The throttled attempt is settled already (its grant released once: the settle
        stage's ``Ticket.released``); a step that serves stores its own grant on the call.
        If none can, the caller gets Sluice's 429 with Retry-After, never Bedrock's bare one.
        """
        pool = call.pool
        assert pool is not None
        refused = BedrockError(
            "ThrottlingException",
            f"Too many requests: Bedrock throttled model pool '{pool.name}' after "
            f"{call.retries} retries and no step of the degradation chain could serve",
            status=429,
            headers=retry_headers(UPSTREAM_RETRY_AFTER_MS),
        )
        try:
            cap = self._scheduled_cap(call.policy, caller.workload)
            if isinstance(cap, BedrockError):
                return Refused(cap)
            est = estimate(route.operation, call.body)
        except BedrockError as exc:
            return Refused(exc)
        tokens = call.usage.input_tokens or est.input_tokens
        ask = DegradeAsk(
            call.policy, route, caller, pool, est, tokens, call.body, cap, call.headers
        )
        return self._degraded(call, await self.degrader.degrade(ask), refused)

    def _degraded(
        self, call: Call, found: Degraded | BedrockError | None, refused: BedrockError
    ) -> Degraded | Refused:
        if found is None:
            return Refused(refused)
        if isinstance(found, BedrockError):
            return Refused(found)
        if isinstance(found, Downgrade):
            call.ticket = found.ticket  # owned by the call from the grant on
            call.pool, call.path, call.degraded = found.pool, found.path, found.headers
            call.tier = self.tiers.choose(call, found.pool, shared=True)
            self.metrics.in_flight_of(found.pool.name).inc()
        else:
            call.degraded = {k: v for k, v in found.headers.items() if k.startswith("x-sluice")}
        return found

    def _estimate(self, call: Call, route: Route, workload: WorkloadInfo) -> RequestEstimate:
        """Input tokens (after the input budget trims), and the upstream read timeout."""
        policy = call.policy
        wl_cfg = policy.policy.workloads[workload.name]
        server = policy.policy.server
        est = estimate(route.operation, call.body)
        input_tokens = est.input_tokens
        if wl_cfg.input_budget is not None:
            trimmed = enforce_budget(
                route.operation, est.body, input_tokens, wl_cfg.input_budget, workload=workload.name
            )
            if trimmed is not None:
                call.body, input_tokens = trimmed.body, trimmed.input_tokens
                call.trimmed_messages = trimmed.dropped_messages
                self.metrics.trimmed.labels(workload.name).inc()
                self.metrics.trimmed_tokens.labels(workload.name).inc(trimmed.dropped_tokens)
        call.usage.input_tokens = input_tokens
        if server.upstream_timeout is not None:
            call.read_timeout_s = upstream_timeout(
                input_tokens, server.upstream_timeout, server.upstream_read_timeout_seconds
            )
        return est

    def _cap(
        self, policy: CompiledPolicy, workload: WorkloadInfo, pool: PoolInfo
    ) -> int | BedrockError | None:
        """The refusal before any limit (a pool not allowed, a paused workload), else the
        schedule's concurrency cap; one call, the usual no-refusal case checked inline."""
        if workload.allowed_pools is not None and pool.name not in workload.allowed_pools:
            return self._forbidden(workload, pool)
        paused = None if self.adaptivity is None else self._paused(policy, workload)
        if paused is not None:
            return paused
        if policy.policy.workloads[workload.name].schedule is None:
            return None
        return self._scheduled_cap(policy, workload)

    @staticmethod
    def _forbidden(workload: WorkloadInfo, pool: PoolInfo) -> BedrockError | None:
        if workload.allowed_pools is None or pool.name in workload.allowed_pools:
            return None
        return BedrockError(
            "AccessDeniedException",
            f"workload '{workload.name}' may not call model pool '{pool.name}' "
            f"(allowed: {', '.join(sorted(workload.allowed_pools))})",
            status=403,
        )

    @staticmethod
    def _breaker_open(policy: CompiledPolicy, pool: PoolInfo) -> BedrockError:
        breaker = policy.policy.models[pool.name].breaker
        wait_s = breaker.open_seconds if breaker else 1.0
        return BedrockError(
            "ThrottlingException",
            f"Too many requests: the circuit breaker of model pool '{pool.name}' is open because "
            "Bedrock throttled or failed too many recent calls; retry in "
            f"{wait_s:.0f} s",
            status=429,
            headers=retry_headers(int(wait_s * 1000)),
        )

    def _paused(self, policy: CompiledPolicy, workload: WorkloadInfo) -> BedrockError | None:
        if self.adaptivity is None or not self.adaptivity.paused(workload.name):
            return None
        rule = policy.policy.workloads[workload.name].pause
        assert rule is not None
        self.metrics.refused.labels(workload.name, "-", workload.priority, "paused").inc()
        return BedrockError(
            "ThrottlingException",
            f"Too many requests: workload '{workload.name}' is paused while priority class "
            f"'{rule.when_class}' answers slower than {rule.factor:g}x its p99 target; "
            f"retry in {PAUSE_RETRY_S} s",
            status=429,
            headers=retry_headers(PAUSE_RETRY_S * 1000),
        )

    def _scheduled_cap(
        self, policy: CompiledPolicy, workload: WorkloadInfo
    ) -> int | BedrockError | None:
        """The schedule's concurrency now; a zero window refuses until it ends."""
        schedule = policy.policy.workloads[workload.name].schedule
        if schedule is None:
            return None
        now = datetime.now(UTC)
        cap = cap_at(schedule, now)
        if cap is None:
            return None
        if cap.concurrency == 0:
            self.metrics.refused.labels(workload.name, "-", workload.priority, "schedule").inc()
            return BedrockError(
                "ThrottlingException",
                f"Too many requests: workload '{workload.name}' is scheduled to run no requests "
                f"during {cap.window}; retry after {describe_next_change(cap, now)}",
                status=429,
                headers=retry_headers(int(cap.seconds_left * 1000)),
            )
        return cap.concurrency
