"""Between two attempts of one call: whether to send it again, and when (issue 9).

A retryable answer (a throttle, a 503) is retried while the deadline and the retry budget
allow, but a throttle on the pool's own quota only into headroom under the adaptive limit:
a retry at a full limit is one more call at a quota Bedrock just said is spent. A class
with a chain goes down it instead; one without waits for headroom, or gives its slot up
and queues again (:mod:`proxy.pipeline.requeue`).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Final

import aiohttp

from proxy.control.controller import Adaptivity
from proxy.metrics import Metrics
from proxy.pipeline.call import Call
from proxy.pipeline.requeue import Requeue, requeue, requeues
from proxy.pipeline.retry import MIN_CALL_S, RetryBudget, next_delay
from proxy.pipeline.settle import observe_attempt
from proxy.pipeline.tier_quota import TierQuotas, on_pool_quota
from proxy.upstream_http import UpstreamReply

#: Longest a throttled retry waits for the reflex's answer before it judges its headroom
#: against the limit it has (the reflex is one Redis round trip, ~1 ms; slower, Redis is in
#: trouble and the limit read at the last tick is all there is).
REFLEX_WAIT_S: Final = 0.25


class Backoff:
    """Decides, for one forwarder, whether a retryable answer is sent again."""

    def __init__(
        self,
        metrics: Metrics,
        adaptivity: Adaptivity | None,
        tiers: TierQuotas,
        requeue: Requeue | None,
    ) -> None:
        self.metrics = metrics
        self.adaptivity = adaptivity
        self.tiers = tiers
        self.requeue = requeue
        self._budgets: dict[tuple[str, str], RetryBudget] = {}
        self._rng = random.Random()

    def budget(self, call: Call) -> RetryBudget:
        """The retry budget of the call's pool and class, charged for its first attempt."""
        # One budget per pool and class: a flood of throttled batch calls must not use up
        # the retries that keep real-time calls answering.
        pool = call.pool.name if call.pool else "-"
        key = (pool, call.caller.priority if call.caller else "-")
        budget = self._budgets.get(key)
        if budget is None:
            ratio = call.policy.policy.server.retry.budget_ratio
            budget = self._budgets[key] = RetryBudget(ratio)
        budget.on_first_attempt()
        return budget

    async def again(
        self,
        call: Call,
        upstream: UpstreamReply,
        error_type: str | None,
        budget: RetryBudget,
        sent: float,
    ) -> bool:
        """Wait out the backoff after the retryable answer ``upstream`` to the attempt sent
        at ``sent`` (perf_counter); True: send again, False: it is the answer (its body
        stays readable either way)."""
        took = time.perf_counter() - sent  # the attempt's own latency, for the controller
        status, lease = upstream.status, call.lease
        # Read first, whatever comes next: the connection goes back before any wait, and
        # the body stays readable if this is the answer after all.
        await _drain(upstream)
        # Asked before a fallback moves the call: the quota this attempt ran on.
        on_pool = on_pool_quota(call)
        deadline = _deadline(call)
        requeue_now = False
        if await self.tiers.escalate(call, status, error_type, deadline - time.perf_counter()):
            delay: float | None = 0.0  # throttled on its tier: at once, on the fallback tier
        else:
            # Asked once: a class without a chain gives its slot up and queues again (it finds
            # headroom in admission); any other throttled retry is judged here, never both.
            requeue_now = on_pool and requeues(call, status, self.adaptivity, self.requeue)
            judged = on_pool and self._fire(call, status) and not requeue_now
            if judged and not await self._headroom(call, deadline):
                return False
            retry = call.policy.policy.server.retry
            remaining = deadline - time.perf_counter()  # after any wait for headroom
            delay = next_delay(call.retries + 1, retry, remaining, budget, self._rng)
        if delay is None:
            self._gave_up(call, budget)
            return False
        # Retries absorb throttles the caller never sees: count them (the pool's own),
        # with the attempt's own latency and the lease it ran on (a tier's fallback moves
        # the call to another before this).
        observe_attempt(self.adaptivity, call, status, on_pool, took, lease=lease)
        call.observed = call.retries
        if requeue_now:
            await self._requeue(call, delay, deadline, status, sent)  # raises: no slot
        else:
            await asyncio.sleep(delay)
        if status == 429 and self.adaptivity is not None and call.pool is not None:
            self.adaptivity.reflex.resent(call.pool.name, lease)  # at Bedrock again
        return True

    def _fire(self, call: Call, status: int) -> bool:
        """A 429 of the pool's quota: fire the throttle reflex (at the throttle, before any
        wait) and say True (the retry must then find headroom under the adaptive limit)."""
        a, pool, caller = self.adaptivity, call.pool, call.caller
        if status != 429 or a is None or pool is None or caller is None:
            return False
        a.reflex.fire(pool.name, call.lease)
        call.reflexed = call.retries
        return True

    async def _headroom(self, call: Call, deadline: float) -> bool:
        """Headroom under the pool's adaptive limit for the retry, judged once the throttle
        reflex has answered: judged at the 429, against the limit from before it, the retry
        went straight into the same throttle (sweep seed 15: two throttles at first contact
        where one was inevitable). A class with a chain needs it now and no hold on it
        (else it goes down its chain); one without waits for it up to its ``max_wait_ms``.
        Every wait leaves the call the time it needs before its deadline."""
        a, pool, caller = self.adaptivity, call.pool, call.caller
        assert a is not None and pool is not None and caller is not None
        spare = deadline - MIN_CALL_S - time.perf_counter()
        await a.reflex.landed(pool.name, min(REFLEX_WAIT_S, max(0.0, spare)))
        wl = call.policy.policy.workloads[caller.workload.name]
        if wl.degrade:
            return a.held_by(pool.name, caller.priority) is None and a.retry_headroom(pool.name)
        spare = deadline - MIN_CALL_S - time.perf_counter()
        return await a.await_headroom(pool.name, max(0.0, min(wl.max_wait_ms / 1000, spare)))

    async def _requeue(
        self, call: Call, delay: float, deadline: float, status: int, sent: float
    ) -> None:
        assert self.adaptivity is not None and self.requeue is not None
        # Bedrock answered this attempt: a refusal raised from here still logs and counts it.
        call.upstream_status = status
        call.upstream_s = time.perf_counter() - call.started
        a, metrics = self.adaptivity, self.metrics
        await requeue(call, delay, deadline, a, self.requeue, metrics, sent)

    def _gave_up(self, call: Call, budget: RetryBudget) -> None:
        """Count a retry the budget (not the retry count or the deadline) refused."""
        if call.retries < call.policy.policy.server.retry.max_retries and budget.tokens < 1:
            pool = call.pool.name if call.pool else "-"
            self.metrics.retry_budget_exhausted.labels(pool).inc()


def _deadline(call: Call) -> float:
    """When the caller stops waiting (perf_counter clock): its workload's deadline."""
    caller = call.caller
    wl = call.policy.policy.workloads[caller.workload.name] if caller else None
    return call.started + (wl.deadline_seconds if wl else 60.0)


async def _drain(upstream: UpstreamReply) -> None:
    """Read an answer that may be retried: its connection goes back to the pool at the end
    of the body, and ``read()`` returns the body again if it is the answer after all (never
    ``release()`` it: a released response's ``read()`` raises)."""
    try:
        await upstream.read()
    except (aiohttp.ClientError, TimeoutError):
        upstream.close()  # a torn answer to a call retried anyway: a fresh connection
