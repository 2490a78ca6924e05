"""The admit stage's side of the priority hold (:mod:`proxy.control.hold`).

A class held back on a pool because Bedrock is throttling a higher class there: with a
degradation chain it goes down the chain at once; without one it waits up to its
``max_wait_ms`` for the hold to end, then queues for a grant as usual; if the hold
outlasts the wait, the answer is Sluice's 429 naming the class that holds it, with
Retry-After.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from proxy.admission.gate import retry_headers
from proxy.control.controller import Adaptivity
from proxy.errors import BedrockError
from proxy.metrics import Metrics
from proxy.pipeline.identify import Caller
from proxy.policy import PoolInfo

#: Retry-After of a held call: a hold ends within a couple of ticks of the last throttle.
HOLD_RETRY_MS = 1000


class Held(NamedTuple):
    """A call's class is held back: by whose throttles, and where to wait for the end."""

    adaptivity: Adaptivity
    holder: str


async def hold_back(
    held: Held, pool: PoolInfo, caller: Caller, max_wait_ms: int, chain: bool, metrics: Metrics
) -> tuple[BedrockError | None, int]:
    """For a held call: (None, the wait left in ms) once the hold ended within
    ``max_wait_ms`` (a class without a ``chain`` waits), else (the refusal, 0)."""
    a, holder = held
    if not chain and max_wait_ms > 0:
        started = time.monotonic()
        if await a.await_release(pool.name, caller.priority, max_wait_ms / 1000):
            waited_ms = int((time.monotonic() - started) * 1000)
            return None, max(0, max_wait_ms - waited_ms)
    workload = caller.workload.name
    metrics.refused.labels(workload, pool.name, caller.priority, "priority_hold").inc()
    return BedrockError(
        "ThrottlingException",
        f"Too many requests: Bedrock is throttling priority class '{holder}' on model pool "
        f"'{pool.name}', so class '{caller.priority}' of workload '{workload}' sends no new "
        f"calls there until it stops; retry in {HOLD_RETRY_MS / 1000:g} s",
        status=429,
        headers=retry_headers(HOLD_RETRY_MS),
    ), 0
