"""Deterministic cancellation: run a coroutine as asyncio's Task does, cancel it at step k.

httpcore proves its pool survives cancellation by cancelling at random moments; this
drives the coroutine by hand instead, so a test can throw ``CancelledError`` into it at
each of its suspension points in turn, and choose which side of the await it lands on:

* ``before``: the awaited future is cancelled first (the task was cancelled while it
  waited: the store has not answered yet);
* ``after``: the awaited future completes first, then the coroutine gets the
  ``CancelledError`` instead of the result (the task was cancelled between the store's
  answer and its own resumption: what asyncio does when ``cancel()`` arrives while the
  task's wake-up is already scheduled).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

Hook = Callable[[int], None]


async def _settled(fut: asyncio.Future[Any]) -> bool:
    """Wait until ``fut`` is done without ever cancelling it; False if we were cancelled."""
    done = asyncio.get_running_loop().create_future()

    def wake(_: object) -> None:
        if not done.done():
            done.set_result(None)

    fut.add_done_callback(wake)
    try:
        await done
    except asyncio.CancelledError:
        # An asyncio.timeout inside the driven coroutine cancels the current task (us):
        # hand that cancellation on, as the Task would.
        return False
    return True


async def run_cancelled_at(
    coro: Coroutine[Any, Any, Any], at: int, side: str, on_suspend: Hook | None = None
) -> bool:
    """Drive ``coro``; at its ``at``-th suspension (0-based) cancel it on ``side``.

    Returns True when the cancellation was injected, False when ``coro`` finished first
    (it has fewer than ``at + 1`` suspension points). ``on_suspend(n)`` runs at each one.
    """
    assert side in ("before", "after")
    n, throw, injected = 0, None, False
    while True:
        try:
            yielded = coro.send(None) if throw is None else coro.throw(throw)
        except (StopIteration, asyncio.CancelledError):
            return injected
        throw = None
        if on_suspend is not None:
            on_suspend(n)
        fut = yielded if isinstance(yielded, asyncio.Future) else None
        if fut is not None:
            fut._asyncio_future_blocking = False  # what Task.__step does with a yielded future
        if n == at:
            injected = True
            if fut is not None:
                if side == "after":
                    await _settled(fut)
                fut.cancel()
            throw = asyncio.CancelledError()
        elif fut is None:
            await asyncio.sleep(0)  # a bare yield: asyncio.sleep(0) inside the coroutine
        elif not await _settled(fut):
            fut.cancel()
            throw = asyncio.CancelledError()
        n += 1
