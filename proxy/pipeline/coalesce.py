"""Request coalescing: identical cacheable requests in flight together make one upstream call.

The first request for a key (the leader) starts the call; requests for the same key that
arrive while it is in flight (followers) wait for its result instead of calling upstream.

Decisions, and why:

* **The call belongs to the group, not to the leader.** It runs in its own task, and every
  waiter — leader included — awaits it through :func:`asyncio.shield`. A leader whose
  client disconnects therefore leaves alone; the followers still get the answer. Only when
  the *last* waiter has left is the call cancelled (nobody wants it, and it holds quota).
* **A failure is shared, not retried.** If the call raises, every waiter gets that
  exception. Coalescing exists for overload; a follower re-calling after a throttle or a
  timeout would multiply exactly the load that failed. Each caller's own error handling
  (degrade chain, client retry) takes it from there.
* **Results are not remembered.** The entry goes away when the call ends; a request that
  arrives afterwards starts a new call. Remembering answers is the response cache's job.

Intended use on the request path: ``cache.get`` → miss → ``coalescer.run(key, call)``
where ``call`` forwards upstream and (on 200) ``cache.put``\\ s the answer.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["Coalescer"]

T = TypeVar("T")


class _Flight:
    """One call in flight and how many callers are waiting for it."""

    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.waiters = 0


async def _invoke(call: Callable[[], Awaitable[T]]) -> T:
    return await call()


class Coalescer:
    """Shares one in-flight call per key among every concurrent caller of that key."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight] = {}

    def __len__(self) -> int:
        """Keys with a call in flight (0 when idle: entries never outlive their call)."""
        return len(self._flights)

    async def run(self, key: str, call: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """The result of ``call()`` — made now, or shared with a call already in flight.

        Returns ``(result, shared)``: ``shared`` is True when another caller's call served
        it. If the call raises, the exception propagates to every waiter. Cancelling one
        waiter never disturbs the others; the call is cancelled when its last waiter is.
        """
        flight = self._flights.get(key)
        shared = flight is not None
        if flight is None:
            flight = _Flight(asyncio.create_task(_invoke(call), name=f"coalesced-call:{key}"))
            self._flights[key] = flight
            flight.task.add_done_callback(functools.partial(self._landed, key, flight))
        flight.waiters += 1
        try:
            result: T = await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                # The last waiter left before the answer: stop the call, and forget it now
                # so a caller arriving next starts afresh rather than joining a dying call.
                flight.task.cancel()
                self._forget(key, flight)
        return result, shared

    def _landed(self, key: str, flight: _Flight, _: object) -> None:
        self._forget(key, flight)
        task = flight.task
        if not task.cancelled():
            # Marks the exception retrieved even if every waiter left before it was raised,
            # so asyncio does not log "Task exception was never retrieved".
            task.exception()

    def _forget(self, key: str, flight: _Flight) -> None:
        # Only this flight's entry: a newer call under the same key may already own it.
        if self._flights.get(key) is flight:
            del self._flights[key]
