"""Stopping a background task never hangs its caller (reloads and shutdowns await it)."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy import tasks


async def test_a_task_that_stops_on_cancel_is_stopped_at_once() -> None:
    task = asyncio.create_task(asyncio.sleep(60))
    await asyncio.sleep(0)
    started = time.monotonic()
    assert await tasks.stop_task(task)
    assert task.cancelled() and time.monotonic() - started < 1.0


async def test_a_task_that_swallows_cancels_is_given_up_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks, "STOP_TIMEOUT_S", 0.5)
    monkeypatch.setattr(tasks, "_RECANCEL_S", 0.1)
    cancels = 0
    release = asyncio.Event()

    async def stubborn() -> None:
        nonlocal cancels
        while not release.is_set():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancels += 1  # swallowed, as a cancel racing a client timeout can be

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    started = time.monotonic()
    assert not await tasks.stop_task(task)
    assert 0.4 < time.monotonic() - started < 2.0
    assert cancels >= 2  # re-sent, not sent once and forgotten
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1)


async def test_a_cancel_is_not_resent_faster_than_the_recancel_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A task whose clean-up after a cancel takes 0.3 s must be allowed to finish it: a
    # second cancel every 0.1 s would restart the clean-up for ever.
    monkeypatch.setattr(tasks, "STOP_TIMEOUT_S", 3.0)
    cleanups = finished = 0

    async def slow_cleanup() -> None:
        nonlocal cleanups, finished
        try:
            await asyncio.sleep(60)
        finally:
            cleanups += 1
            await asyncio.sleep(0.3)
            finished += 1

    task = asyncio.create_task(slow_cleanup())
    await asyncio.sleep(0)
    assert await tasks.stop_task(task)
    assert (cleanups, finished) == (1, 1)
