"""The request path's view of admission: ask the store, turn a refusal into backpressure.

The store decides; this module makes the decision actionable for the caller: a
Bedrock-shaped 429 ``ThrottlingException`` (so boto3 retries it by itself) naming
the workload, model pool and limit that refused, a ``Retry-After`` that never
points earlier than the limit has room, and IETF ``RateLimit`` headers on every
answer. It also applies each class's fail mode when the store is unreachable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable
from dataclasses import dataclass

from proxy.admission import AdmitPlan, Decision, Store, StoreUnavailable
from proxy.admission.fit import refill_ms
from proxy.errors import BedrockError
from proxy.metrics import Metrics
from proxy.policy import PoolInfo, WorkloadInfo

log = logging.getLogger("sluice.admission")

_LIMIT_WORDS = {
    "requests_per_minute": "requests/min",
    "tokens_per_minute": "tokens/min",
    "concurrency": "concurrent requests",
}
_STORE_DOWN_RETRY_S = 1


@dataclass(slots=True)
class Ticket:
    """An admitted call: what to settle when it ends."""

    plan: AdmitPlan
    lease: str | None
    reserved_tokens: int
    headers: dict[str, str]
    #: Near a concurrency cap: confirm the release before answering (Decision.tight).
    confirm: bool = False
    #: Settled already: a grant is given back exactly once, however often it is settled.
    released: bool = False


def _quota_unit(binding: str) -> str:
    return ';qu="concurrent-requests"' if binding.endswith("concurrency") else ""


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    """``RateLimit-Policy`` / ``RateLimit`` for the binding limit plus remaining counts."""
    headers: dict[str, str] = {}
    if decision.binding is not None:
        name = decision.binding
        window = "" if name.endswith("concurrency") else ";w=60"
        headers["RateLimit-Policy"] = f'"{name}";q={int(decision.limit)}{window}{_quota_unit(name)}'
        reset = math.ceil(decision.reset_ms / 1000)
        headers["RateLimit"] = f'"{name}";r={max(0, int(decision.remaining))};t={reset}'
    if decision.remaining_requests is not None:
        headers["x-ratelimit-remaining-requests"] = str(max(0, decision.remaining_requests))
    if decision.remaining_tokens is not None:
        headers["x-ratelimit-remaining-tokens"] = str(max(0, decision.remaining_tokens))
    return headers


def retry_headers(retry_after_ms: int) -> dict[str, str]:
    """The three spellings of "come back later" that boto3 and the Anthropic SDK read."""
    ms = max(1, retry_after_ms)
    return {
        "Retry-After": str(max(1, math.ceil(ms / 1000))),
        "retry-after-ms": str(ms),
        "x-amz-retry-after": str(ms),
    }


def refusal_message(
    workload: str, priority: str, pool: str, decision: Decision, tier: str | None = None
) -> str:
    """A message naming the workload, the model pool (and tier with its own quota) and limit."""
    scope, _, limit = (decision.refused_by or "limit").partition(".")
    words = _LIMIT_WORDS.get(limit, limit)
    retry_s = decision.retry_after_ms / 1000
    where = f"model pool '{pool}'" + (f" (service tier '{tier}')" if tier else "")
    if decision.refused_by == "pool.queue":
        what = (
            f"requests of equal or higher priority are waiting for {where} "
            f"(workload '{workload}', class '{priority}')"
        )
    elif scope == "workload":
        what = f"workload '{workload}' reached its {words} limit on {where}"
    elif scope == "class":
        what = (
            f"priority class '{priority}' of workload '{workload}' reached its share of the "
            f"{words} of {where} (the rest is reserved for higher classes)"
        )
    else:
        what = f"{where} reached its {words} limit (workload '{workload}')"
    return f"Too many requests: {what}; retry in {retry_s:.1f} s"


def cap_retry_hint(plan: AdmitPlan, decision: Decision) -> None:
    """Never tell a caller to wait longer than the refusing bucket needs to refill from empty.

    Debt (usage settled above its reservation) can push a bucket's own wait past that;
    a caller told to come back after a full refill is at worst refused once more.
    """
    full = refill_ms(plan, decision.refused_by)
    if full is not None and decision.retry_after_ms > full:
        decision.retry_after_ms = max(1, math.ceil(full))


class Gate:
    """Admission for the request path: one store call to admit, one queued to settle."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics

    async def admit(
        self,
        workload: WorkloadInfo,
        priority: str,
        pool: PoolInfo,
        plan: AdmitPlan,
        tokens: int,
        *,
        max_wait_ms: int = 0,
    ) -> Ticket | BedrockError:
        """Admit a call, or return (never raise) the :class:`BedrockError` to answer with.

        With ``max_wait_ms > 0`` a refused call first waits up to that long for capacity
        (:meth:`Store.admit_waiting`); the 429 then carries the last refusal's hints.
        """
        try:
            if max_wait_ms > 0:
                decision = await self.store.admit_waiting(plan, tokens, max_wait_ms)
            else:
                decision = await self.store.admit(plan, tokens)
        except StoreUnavailable as exc:
            self.metrics.store_errors.labels("admit").inc()
            if workload.fail_open:
                self.metrics.fail_open.labels(workload.name, pool.name).inc()
                log.warning("store unavailable, failing open for %s: %s", workload.name, exc)
                return Ticket(plan, None, 0, {"x-sluice-admission": "fail-open"})
            return BedrockError(
                "ServiceUnavailableException",
                f"Sluice's quota store is unreachable and class '{priority}' of workload "
                f"'{workload.name}' fails closed; retry in {_STORE_DOWN_RETRY_S} s",
                status=503,
                headers=retry_headers(_STORE_DOWN_RETRY_S * 1000),
            )
        headers = rate_limit_headers(decision)
        if not decision.admitted:
            limit = decision.refused_by or "unknown"
            self.metrics.refused.labels(workload.name, pool.name, priority, limit).inc()
            cap_retry_hint(plan, decision)
            headers.update(retry_headers(decision.retry_after_ms))
            return BedrockError(
                "ThrottlingException",
                refusal_message(workload.name, priority, pool.name, decision, plan.tier),
                status=429,
                headers=headers,
            )
        self.metrics.admitted_of.inc((workload.name, pool.name, priority))
        self.metrics.reserved_of.inc((workload.name, pool.name), tokens)
        return Ticket(plan, decision.lease, tokens, headers, decision.tight)

    def settle(self, ticket: Ticket, actual_tokens: int) -> Awaitable[None] | None:
        """Release the lease and settle real usage (queued, batched by the store).

        Returns what to await before answering when the ticket asks for a confirmed release.
        """
        if ticket.released:
            return None
        ticket.released = True
        plan = ticket.plan
        self.metrics.settled_of.inc((plan.workload, plan.pool), actual_tokens)
        if ticket.lease is None:
            return None
        return self.store.settle(
            plan,
            ticket.lease,
            ticket.reserved_tokens,
            actual_tokens,
            confirm=ticket.confirm,
        )
