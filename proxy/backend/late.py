"""Calls that must not be abandoned when their caller stops waiting.

``asyncio.timeout`` around a Redis call cancels our side only: a script already
written to a stalled server still runs when the server resumes. For the admit script
that means grants nobody will ever settle. :func:`outlive` answers the caller at the
timeout but keeps the call going, and hands its late reply to a callback that gives
those grants back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def outlive(
    call: Coroutine[Any, Any, T],
    timeout_s: float,
    late: Callable[[T], None],
    keep: set[asyncio.Task[Any]],
) -> T:
    """Await ``call`` for at most ``timeout_s``; past that raise TimeoutError, and when the
    call completes anyway pass its result to ``late``. ``keep`` holds the running task."""
    task = asyncio.ensure_future(call)
    try:
        async with asyncio.timeout(timeout_s):
            return await asyncio.shield(task)
    except (TimeoutError, asyncio.CancelledError):
        if task.done():
            raise
        keep.add(task)
        task.add_done_callback(lambda t: _finish(t, late, keep))
        raise


def _finish(task: asyncio.Task[T], late: Callable[[T], None], keep: set[asyncio.Task[Any]]) -> None:
    keep.discard(task)
    # A late failure means the script did not run, or its reply is lost: nothing to give
    # back here (what it granted expires with the lease TTL, never renewed).
    if not task.cancelled() and task.exception() is None:
        late(task.result())
