"""The store contract the request path depends on, and its one exception."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol, runtime_checkable

from proxy.admission.model import AdmitPlan, Decision
from proxy.backend import BackendUnavailable

#: The store could not decide in time (error or timeout); the caller picks fail-open/closed.
StoreUnavailable = BackendUnavailable


@runtime_checkable
class Store(Protocol):
    """Atomic admission across every limit of a plan, shared by all instances of a store."""

    async def start(self) -> None:
        """Load scripts and start the lease heartbeat; call once, inside the event loop."""

    async def close(self) -> None:
        """Apply queued settles, stop background tasks, close connections."""

    async def admit(self, plan: AdmitPlan, tokens: int) -> Decision:
        """Admit one request reserving ``tokens``, or refuse it changing nothing.

        Raises :class:`StoreUnavailable` when the store cannot answer within its timeout.
        An admitted request MUST be settled exactly once (also when it fails or is cancelled).
        """

    async def admit_waiting(self, plan: AdmitPlan, tokens: int, max_wait_ms: int) -> Decision:
        """Like :meth:`admit`, but a refused request may wait up to ``max_wait_ms`` for room.

        Waiters are served highest class (lowest ``plan.rank``) first, FIFO within a class,
        across every instance of the store; while one waits for pool capacity, requests
        behind it are refused with ``pool.queue``. Refused at once (the refusal's
        ``retry_after_ms`` says when) if the deadline cannot be met or this instance's
        queue for the pool is full; ``max_wait_ms <= 0`` is :meth:`admit`.
        """

    def settle(
        self,
        plan: AdmitPlan,
        lease: str,
        reserved_tokens: int,
        actual_tokens: int,
        *,
        confirm: bool = False,
    ) -> Awaitable[None] | None:
        """Release ``lease`` and refund ``reserved - actual`` tokens; queued, never blocks.

        With ``confirm``, a store that queues returns an awaitable done once the release
        has reached the shared state (or failed); None when it is applied already.
        """

    async def flush(self) -> None:
        """Return once every settle queued so far has been applied (or counted as failed)."""

    async def ping(self) -> bool:
        """True when the store answers within its timeout (readiness)."""

    def shed_ahead(self, pool: str) -> None:
        """Give back at once every grant held ahead of demand on ``pool`` (a sign of
        contention there: a throttle, say); a store that holds none does nothing."""

    async def set_pool_limit(self, pool: str, limit: int | None) -> None:
        """Set the pool's dynamic concurrency limit (``None`` clears it) for every instance."""

    async def pool_stats(self, pool: str) -> dict[str, float]:
        """in_flight, dynamic_limit (-1 = none) and held_here (this instance's) of a pool."""

    async def holds_lease(self, pool: str, lease: str) -> bool:
        """Is ``lease`` still held on ``pool`` (not yet released or expired)?"""
