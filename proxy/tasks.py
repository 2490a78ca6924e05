"""Stopping a background loop without ever hanging the caller.

Every ``close()`` in Sluice that stops a task goes through :func:`stop_task`: a plain
``task.cancel(); await task`` hangs for ever when the cancel is swallowed, and on
Python 3.11 redis-py swallows some (a cancel that lands while a command completes:
3.11's ``asyncio.wait_for`` returns the result and drops the cancel). One swallowed
cancel in a batch worker's loop hung an app's shutdown, and CI with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("sluice.tasks")

#: How long close() waits for a task, and how often it re-sends the cancel.
STOP_TIMEOUT_S = 5.0
_RECANCEL_S = 1.0


async def stop_task(task: asyncio.Task[Any]) -> bool:
    """Cancel ``task`` and wait for it (True), at most ``STOP_TIMEOUT_S`` (False).

    The cancel is sent at once (before this coroutine first yields) and re-sent once a
    second, not faster: a swallowed cancel is caught by the next one, but one that lands
    while the task is still cleaning up after the previous one only restarts that clean-up.
    """
    return not await _stop([task])


async def stop_tasks(tasks: Iterable[asyncio.Task[Any] | None], what: str) -> None:
    """Stop ``tasks`` together; one that will not stop is logged (with its stack) and left."""
    for task in await _stop([t for t in tasks if t is not None]):
        log.error(
            "%s: a background task did not stop within %.0f s; left to finish on its own",
            what,
            STOP_TIMEOUT_S,
            extra={
                "fields": {
                    "event": "task_stuck",
                    "what": what,
                    "stack": repr(task.get_stack(limit=5)),
                }
            },
        )


async def _stop(tasks: list[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Cancel ``tasks`` now, re-send to those still running each period; the ones left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STOP_TIMEOUT_S
    pending = {t for t in tasks if not t.done()}
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(_RECANCEL_S, deadline - loop.time()))
    for task in tasks:
        if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
            # Closing goes on, but a loop that died of a bug is worth its traceback.
            log.error("background task failed before it was stopped", exc_info=exc)
    return [t for t in tasks if not t.done()]
