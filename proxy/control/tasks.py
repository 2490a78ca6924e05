"""Stopping a background loop without ever hanging the caller."""

from __future__ import annotations

import asyncio
import contextlib

#: How long close() waits for the tick task, and how often it re-sends the cancel.
STOP_TIMEOUT_S = 5.0
_RECANCEL_S = 1.0


async def stop_task(task: asyncio.Task[None]) -> bool:
    """Cancel ``task`` and wait for it (True), at most ``STOP_TIMEOUT_S`` (False).

    The cancel is re-sent once a second, not faster: a cancel that races a Redis timeout
    can be swallowed (redis-py on 3.11), but one that lands while the task is still
    cleaning up after the previous one only restarts that clean-up.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STOP_TIMEOUT_S
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=min(_RECANCEL_S, deadline - loop.time()))
    if not task.done():
        return False
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return True
