"""A throttled call of a class without a chain is retried on a new grant (issue 9).

After a quota cut the fleet cuts its adaptive limit below what is in flight. A call
Bedrock throttled then must not keep (or be re-granted at once) a slot above what Bedrock
grants, nor give up with Bedrock's 429 while lower classes hold slots: it gives its slot
up for the backoff and until the fleet has answered the throttle, then queues in priority
order under the limit as it is now, so the highest class takes the slots lower classes
give up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from proxy.admission.gate import retry_headers
from proxy.control.controller import Adaptivity
from proxy.control.law import for_concurrency
from proxy.errors import BedrockError
from proxy.metrics import Metrics
from proxy.pipeline.call import Call
from proxy.pipeline.retry import MIN_CALL_S

#: Retry-After of the 429 when no slot came (Bedrock's own throttles get the same).
RETRY_AFTER_MS = 1000

#: Gives up a throttled call's grant, awaits the given backoff, then queues it for a new
#: grant until the given time (perf_counter): None once granted, else the refusal
#: (:meth:`proxy.pipeline.Pipeline.requeue`).
Requeue = Callable[[Call, Awaitable[None], float], Awaitable[BedrockError | None]]


def requeues(call: Call, status: int, a: Adaptivity | None, readmit: Requeue | None) -> bool:
    """Is a throttled call retried on a new grant? A class without a chain holding a grant
    on a pool with an adaptive limit (its old slot may be one Bedrock no longer grants)."""
    pool, caller, ticket = call.pool, call.caller, call.ticket
    if status != 429 or readmit is None or a is None or pool is None or caller is None:
        return False
    limit = a.limit(pool.name)
    if ticket is None or ticket.released or limit is None:
        return False
    policy = call.policy.policy
    adaptive = policy.models[pool.name].adaptive
    if adaptive is not None and limit <= adaptive.floor:
        # No cut can come: giving the slot up would only take it straight back and send
        # again into the throttle. Wait for headroom under the limit, as any retry does.
        return False
    return not policy.workloads[caller.workload.name].degrade


async def requeue(
    call: Call,
    delay: float,
    deadline: float,
    a: Adaptivity,
    readmit: Requeue,
    metrics: Metrics,
    sent: float,
) -> None:
    """Give up the throttled call's slot for its backoff and until the fleet answered the
    throttle to the attempt sent at ``sent`` (perf_counter), then queue for a slot; all
    waits stay within the workload's ``max_wait_ms`` and the deadline. Raises Sluice's 429
    (with Retry-After) when no slot came."""
    pool, caller = call.pool, call.caller
    assert pool is not None and caller is not None
    wl = call.policy.policy.workloads[caller.workload.name]
    now = time.perf_counter()
    until = min(now + wl.max_wait_ms / 1000, deadline - MIN_CALL_S)
    backoff = _backoff(delay, await_reaction(call, a, sent, until - now))
    refused = await readmit(call, backoff, until)
    if refused is None:
        return
    if refused.status != 429 or not for_concurrency(refused.headers, refused.message):
        raise refused  # not a slot that did not free (a store outage, a rate, a schedule)
    metrics.requeue_refused.labels(pool.name).inc()
    raise BedrockError(
        "ThrottlingException",
        f"Too many requests: Bedrock throttled model pool '{pool.name}' and no slot under "
        f"its adaptive limit freed within {wl.max_wait_ms} ms; retry in "
        f"{RETRY_AFTER_MS / 1000:g} s",
        status=429,
        headers=retry_headers(RETRY_AFTER_MS),
    )


async def await_reaction(call: Call, a: Adaptivity, sent: float, wait_s: float) -> None:
    """Wait until the pool's fleet limit was cut after ``sent`` (perf_counter, the throttled
    attempt's send): the fleet's answer to its throttle, the reflex's (at once; one that
    landed while the attempt was out read it in flight already) or the controller's (it
    cuts after a throttled interval). A raise is no answer. Waiting for a change from the
    limit as it is now instead sat out a whole interval whenever the reflex had already
    answered (a policy with a 3 s interval and 0.5 s of waiting lost P0 calls to it). At
    most one interval and one tick (a limit at its floor is not cut again), and ``wait_s``."""
    assert call.pool is not None
    pool = call.pool.name
    policy = call.policy.policy
    adaptive = policy.models[pool].adaptive
    tick = policy.server.adaptivity.tick_seconds
    if adaptive is None:
        return
    end = time.perf_counter() + min(wait_s, adaptive.interval_seconds + tick)
    await a.reflex.landed(pool, max(0.0, end - time.perf_counter()))
    while a.limits.cut_at.get(pool, float("-inf")) <= sent:
        if (left := end - time.perf_counter()) <= 0:
            return
        await asyncio.sleep(min(left, tick / 2))


async def _backoff(delay: float, reaction: Awaitable[None]) -> None:
    """The jittered backoff and the fleet's answer to the throttle, whichever is longer."""
    await asyncio.gather(asyncio.sleep(delay), reaction)
