"""The store's batches in flight: what a flush or a close waits for.

A batch is in flight from when it is sent until its reply, or until it times out: from
then its callers have been answered and it only waits for a late reply (what it granted
then goes back), which neither a flush nor a close waits for. Those calls are kept in the
script runner's ``late`` set, which :meth:`~proxy.backend.runner.ScriptRunner.abandon`
cancels on close.

Most batches are written at once on the direct connection and answered by a done-callback
(:meth:`InFlight.sent`): at low load every request is a batch of one, and a task each
would cost one per request (issue 12). The rest (a connection to make, scripts to reload,
a cluster) run in a task (:meth:`InFlight.spawn`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["InFlight"]


class InFlight:
    """Batches sent and not yet answered nor timed out."""

    def __init__(self, late: set[asyncio.Future[Any]]) -> None:
        """``late``: the runner's calls that timed out and still wait for their reply."""
        self._calls: set[asyncio.Future[Any]] = set()
        self._late = late
        #: Woken when a batch times out (see :meth:`one_moved`).
        self._moved: set[asyncio.Future[None]] = set()

    def __bool__(self) -> bool:
        return bool(self._calls)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a batch in a task of its own."""
        task = asyncio.get_running_loop().create_task(coro)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    def sent(self, call: asyncio.Future[Any], answered: Callable[[], None]) -> None:
        """Track a batch written without a task (the future of its reply) until its reply,
        then run ``answered``."""
        self._calls.add(call)

        def done(call: asyncio.Future[Any]) -> None:
            self._calls.discard(call)
            self._late.discard(call)
            answered()

        call.add_done_callback(done)

    def timed_out(self, call: asyncio.Future[Any]) -> None:
        """``call`` (a batch's task, or its reply's future) timed out: its callers were
        answered, it now only waits for its reply, as a late call."""
        self._calls.discard(call)
        self._late.add(call)
        for moved in self._moved:  # a flush or close waiting on it goes on
            if not moved.done():
                moved.set_result(None)

    async def one_moved(self) -> None:
        """Wait until one batch ends or times out."""
        moved: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._moved.add(moved)
        try:
            await asyncio.wait([*self._calls, moved], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._moved.discard(moved)
            moved.cancel()
