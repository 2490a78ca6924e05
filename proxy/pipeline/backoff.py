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

import aiohttp

from proxy.control.controller import Adaptivity
from proxy.metrics import Metrics
from proxy.pipeline.call import Call
from proxy.pipeline.requeue import Requeue, requeue, requeues
from proxy.pipeline.retry import RetryBudget, next_delay
from proxy.pipeline.settle import observe_attempt
from proxy.pipeline.tier_quota import TierQuotas, on_pool_quota


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
        upstream: aiohttp.ClientResponse,
        error_type: str | None,
        budget: RetryBudget,
    ) -> bool:
        """Wait out the backoff after the retryable answer ``upstream``; True: send again
        (its body was read and its connection released), False: it is the answer."""
        status, lease = upstream.status, call.lease
        # Asked before a fallback moves the call: the quota this attempt ran on.
        on_pool = queue_again = on_pool_quota(call)
        deadline = _deadline(call)
        judge = False
        if await self.tiers.escalate(call, status, error_type, deadline - time.perf_counter()):
            delay: float | None = 0.0  # throttled on its tier: at once, on the fallback tier
            queue_again = False
        else:
            judge = on_pool and self._throttled(call, status)
            retry = call.policy.policy.server.retry
            remaining = deadline - time.perf_counter()
            delay = next_delay(call.retries + 1, retry, remaining, budget, self._rng)
        if delay is None:
            self._gave_up(call, budget)
            return False
        await _drain(upstream)  # its body stays readable: it is the answer if no retry
        if judge:
            # Headroom is judged once the reflex has answered, not at the throttle: judged
            # at the 429, against the limit before the reflex lowered it to what Bedrock
            # grants, the retry went straight into the same throttle (sweep seed 15: two
            # throttles at first contact where one was inevitable).
            assert self.adaptivity is not None and call.pool is not None
            started = time.perf_counter()
            await self.adaptivity.reflex.landed(call.pool.name, delay)
            if not await self._headroom(call, deadline):
                return False
            delay = max(0.0, delay - (time.perf_counter() - started))
        # Retries absorb throttles the caller never sees: count them (the pool's own).
        observe_attempt(self.adaptivity, call, status, on_pool, call.started)
        if queue_again and requeues(call, status, self.adaptivity, self.requeue):
            await self._requeue(call, delay, deadline, status)  # raises: no slot
        elif delay > 0:
            await asyncio.sleep(delay)
        if status == 429 and self.adaptivity is not None and call.pool is not None:
            self.adaptivity.reflex.resent(call.pool.name, lease)  # at Bedrock again
        return True

    def _throttled(self, call: Call, status: int) -> bool:
        """On a 429 of the pool's quota, fire the throttle reflex (at the throttle, before
        any wait). True when the retry must then find headroom under the adaptive limit (a
        class that gives its slot up and queues again finds it in admission instead)."""
        a, pool, caller = self.adaptivity, call.pool, call.caller
        if status != 429 or a is None or pool is None or caller is None:
            return False
        a.reflex.fire(pool.name, call.lease)
        call.reflexed = call.retries
        return not requeues(call, status, a, self.requeue)

    async def _headroom(self, call: Call, deadline: float) -> bool:
        """Headroom under the pool's adaptive limit for the retry: a class with a chain needs
        it now and no hold on it (else it goes down its chain); one without waits for it up
        to its ``max_wait_ms``, within the deadline."""
        a, pool, caller = self.adaptivity, call.pool, call.caller
        assert a is not None and pool is not None and caller is not None
        wl = call.policy.policy.workloads[caller.workload.name]
        if wl.degrade:
            return a.held_by(pool.name, caller.priority) is None and a.retry_headroom(pool.name)
        wait_s = min(wl.max_wait_ms / 1000, deadline - time.perf_counter())
        return await a.await_headroom(pool.name, max(0.0, wait_s))

    async def _requeue(self, call: Call, delay: float, deadline: float, status: int) -> None:
        assert self.adaptivity is not None and self.requeue is not None
        # Bedrock answered this attempt: a refusal raised from here still logs and counts it.
        call.upstream_status = status
        call.upstream_s = time.perf_counter() - call.started
        await requeue(call, delay, deadline, self.adaptivity, self.requeue, self.metrics)

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


async def _drain(upstream: aiohttp.ClientResponse) -> None:
    """Read an answer that may be retried, so its connection is reused (the body stays
    readable: ``read()`` returns it again)."""
    try:
        await upstream.read()
    except (aiohttp.ClientError, TimeoutError):
        upstream.close()  # a torn answer to a call retried anyway: a fresh connection
    else:
        upstream.release()
