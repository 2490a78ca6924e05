"""The settle stage: real usage, the breaker/controller sample, the lease released.

:meth:`Settler.settle` runs exactly once per call, from the ``finally`` of whoever
runs it, so a failed or cancelled call releases its lease like a finished one. It
queues the release (never awaits the store) and returns what to await when the
caller must not see the answer before the slot is free (a grant near a cap).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable

from proxy.admission.estimate import settled_tokens
from proxy.admission.gate import Gate
from proxy.control.controller import Adaptivity
from proxy.log import AccessLog
from proxy.metrics import Metrics
from proxy.pipeline.call import Call
from proxy.pipeline.tier_quota import charge, on_pool_quota


def observe_attempt(
    adaptivity: Adaptivity | None,
    call: Call,
    status: int,
    on_pool: bool,
    seconds: float | None = None,
    *,
    lease: str | None = None,
    unanswered: bool = False,
) -> None:
    """Report one upstream attempt of ``call`` to the controller and the breaker (its
    latency: ``call.upstream_s``, or ``seconds`` for an attempt about to be retried);
    ``on_pool``: answered on the pool's own quota (not a tier's); ``lease``: the one the
    attempt ran on, when the call holds another now; ``unanswered``: Bedrock did not answer
    it within the read timeout)."""
    if adaptivity is None or call.pool is None:
        return
    if seconds is None:
        seconds = call.upstream_s
    adaptivity.observe_status(
        call.pool.name,
        call.caller.priority if call.caller else "-",
        seconds * 1000,
        status,
        on_pool=on_pool,
        lease=call.lease if lease is None else lease,
        reflex=call.reflexed != call.retries,  # not twice for one throttle (see backoff)
        unanswered=unanswered,
    )


#: Longest an answer waits for its release to be confirmed (see :func:`confirmed`).
CONFIRM_TIMEOUT_S = 0.5


async def confirmed(released: Awaitable[None]) -> None:
    """Hold the answer until ``released`` is done, for at most :data:`CONFIRM_TIMEOUT_S`.

    Admitted near a concurrency cap: the caller may send its next call (to any
    instance) the moment it has this answer, and that call must not find this one
    still holding a slot. Bounded: a slow store must not hold the answer.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CONFIRM_TIMEOUT_S):
            await released


class Settler:
    """Settles calls (lease, usage, controller sample) and writes their access-log lines."""

    def __init__(
        self, gate: Gate, metrics: Metrics, access_log: AccessLog, adaptivity: Adaptivity | None
    ) -> None:
        self.gate = gate
        self.metrics = metrics
        self.access_log = access_log
        self.adaptivity = adaptivity

    def settle(self, call: Call) -> Awaitable[None] | None:
        """Report ``call``'s upstream outcome and release the grant it holds, with real usage.

        A grant is released once however often this runs (``Ticket.released``); a stage
        that re-admits mid-call (a downgrade after an upstream throttle) settles, then
        stores the new grant on the call, which this releases in turn.
        """
        status = call.upstream_status
        if status is not None and call.observed != call.retries:
            observe_attempt(self.adaptivity, call, status, on_pool_quota(call))
        return self.release(call)

    def release(self, call: Call, *, refused: bool = False) -> Awaitable[None] | None:
        """Release the grant ``call`` holds (once), charging its real usage (nothing when
        Bedrock ``refused`` the attempt); no outcome is reported here."""
        ticket = call.ticket
        if ticket is None or ticket.released or call.pool is None:
            return None
        self.metrics.in_flight_of(call.pool.name).dec()
        return self.gate.settle(ticket, 0 if refused else self._actual_tokens(call))

    @staticmethod
    def _actual_tokens(call: Call) -> int:
        usage, pool, ticket = call.usage, call.pool, call.ticket
        assert pool is not None and ticket is not None
        if usage.known:
            return settled_tokens(
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_write_tokens,
                pool.output_weight,
            )
        if call.upstream_status is not None and call.upstream_status != 200:
            return 0  # Bedrock charges nothing for a call it refused or failed
        return ticket.reserved_tokens  # unknown usage: keep the reservation

    def record(self, call: Call) -> None:
        """Count ``call`` in the request metrics and write its access-log line."""
        route = call.route
        pool = call.pool.name if call.pool else "-"
        workload = call.caller.workload.name if call.caller else "-"
        operation = route.operation if route else "-"
        metrics = self.metrics
        metrics.requests_of.inc(
            (operation, pool, workload, str(call.status), call.served_tier or "-")
        )
        if pool in call.policy.priced:  # (no call made for a pool without prices)
            charge(metrics, call, workload, pool)
        if call.usage.known:
            metrics.tokens_of.inc((workload, pool, "input"), call.usage.input_tokens)
            metrics.tokens_of.inc((workload, pool, "output"), call.usage.output_tokens)
        if call.upstream_status is not None and route is not None:
            metrics.latency_of.observe((pool, operation), call.upstream_s)
        if self.access_log.enabled:
            self.access_log.write(self._line(call, operation, pool, workload))

    @staticmethod
    def _line(call: Call, operation: str, pool: str, workload: str) -> dict[str, object]:
        total = time.perf_counter() - call.started
        caller, usage, degraded = call.caller, call.usage, call.degraded
        upstream_s = call.upstream_s
        return {
            "event": "request",
            "request_id": call.request_id,
            "operation": operation,
            "model": call.route.model_id if call.route else None,
            "pool": pool,
            "workload": workload,
            "priority": caller.priority if caller else None,
            "via": caller.via if caller else None,
            "status": call.status,
            "error_type": call.error_type,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "usage_known": usage.known,
            "upstream_ms": round(upstream_s * 1000, 2),
            "overhead_ms": round(max(0.0, total - upstream_s) * 1000, 3),
            "disconnected": call.disconnected,
            "retries": call.retries,
            "trimmed_messages": call.trimmed_messages,
            "degraded": degraded.get("x-sluice-degraded") if degraded else None,
            "coalesced": call.coalesced,
            "service_tier": call.served_tier,
        }
