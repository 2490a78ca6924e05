"""Request coalescing: one upstream call per key in flight, and no leaks on any exit path.

Events are ordered with futures, not sleeps (aio-libs/aiojobs style); cancellation tests
follow encode/httpcore's ``tests/test_cancellations.py``: whatever is cancelled, the
in-flight map ends empty.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.pipeline.cache import CachedResponse
from proxy.pipeline.coalesce import Coalescer

ANSWER = CachedResponse(200, (("Content-Type", "application/json"),), b'{"ok":true}', 1.0)


class Upstream:
    """A fake upstream call that blocks until released and counts its invocations."""

    def __init__(self) -> None:
        self.calls = 0
        self.started = asyncio.Event()
        self.release: asyncio.Future[CachedResponse] = asyncio.get_running_loop().create_future()
        self.cancelled = False

    async def __call__(self) -> CachedResponse:
        self.calls += 1
        self.started.set()
        try:
            return await self.release
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def _settle() -> None:
    """Let every ready task run until they block again."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_fifty_identical_requests_make_one_call() -> None:
    coalescer, upstream = Coalescer(), Upstream()
    tasks = [asyncio.create_task(coalescer.run("k", upstream)) for _ in range(50)]
    await upstream.started.wait()
    await _settle()
    assert len(coalescer) == 1
    upstream.release.set_result(ANSWER)
    results = await asyncio.gather(*tasks)
    assert upstream.calls == 1
    assert all(result is ANSWER for result, _ in results)
    assert [shared for _, shared in results].count(False) == 1
    assert len(coalescer) == 0


async def test_different_keys_do_not_share() -> None:
    coalescer = Coalescer()
    first, second = Upstream(), Upstream()
    a = asyncio.create_task(coalescer.run("a", first))
    b = asyncio.create_task(coalescer.run("b", second))
    await first.started.wait()
    await second.started.wait()
    first.release.set_result(ANSWER)
    second.release.set_result(ANSWER)
    assert await asyncio.gather(a, b) == [(ANSWER, False), (ANSWER, False)]
    assert (first.calls, second.calls) == (1, 1)


async def test_a_request_after_the_call_ends_calls_again() -> None:
    coalescer = Coalescer()
    for _ in range(2):
        upstream = Upstream()
        upstream.release.set_result(ANSWER)
        assert await coalescer.run("k", upstream) == (ANSWER, False)
        assert upstream.calls == 1
    assert len(coalescer) == 0


async def test_followers_get_the_answer_when_the_leader_is_cancelled() -> None:
    coalescer, upstream = Coalescer(), Upstream()
    leader = asyncio.create_task(coalescer.run("k", upstream))
    await upstream.started.wait()
    followers = [asyncio.create_task(coalescer.run("k", upstream)) for _ in range(3)]
    await _settle()
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert not upstream.cancelled  # the call belongs to the group, not to the leader
    upstream.release.set_result(ANSWER)
    assert await asyncio.gather(*followers) == [(ANSWER, True)] * 3
    assert upstream.calls == 1 and len(coalescer) == 0


async def test_the_call_is_cancelled_when_every_waiter_has_left() -> None:
    coalescer, upstream = Coalescer(), Upstream()
    tasks = [asyncio.create_task(coalescer.run("k", upstream)) for _ in range(3)]
    await upstream.started.wait()
    await _settle()
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    await _settle()
    assert upstream.cancelled
    assert len(coalescer) == 0


async def test_a_new_request_does_not_join_a_call_being_cancelled() -> None:
    coalescer, dying = Coalescer(), Upstream()
    task = asyncio.create_task(coalescer.run("k", dying))
    await dying.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fresh = Upstream()
    fresh.release.set_result(ANSWER)
    assert await coalescer.run("k", fresh) == (ANSWER, False)
    assert fresh.calls == 1 and len(coalescer) == 0


async def test_a_failure_reaches_every_waiter_and_is_not_retried() -> None:
    coalescer, upstream = Coalescer(), Upstream()
    tasks = [asyncio.create_task(coalescer.run("k", upstream)) for _ in range(10)]
    await upstream.started.wait()
    await _settle()
    upstream.release.set_exception(TimeoutError("upstream read timed out"))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, TimeoutError) for r in results)
    assert upstream.calls == 1 and len(coalescer) == 0


async def test_a_failure_nobody_waits_for_is_not_reported_as_unretrieved() -> None:
    # filterwarnings=error and asyncio's "Task exception was never retrieved" log: the
    # coalescer must consume the exception of a call whose waiters all left.
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    coalescer = Coalescer()
    failed = loop.create_future()

    async def call() -> CachedResponse:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            failed.set_result(None)
            raise ValueError("cleanup failed") from None
        raise AssertionError("unreachable")

    task = asyncio.create_task(coalescer.run("k", call))
    await _settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await failed
    await _settle()
    assert len(coalescer) == 0
    del task
    gc.collect()  # an unretrieved exception is reported when its task is collected
    assert reported == []


async def test_a_call_that_raises_at_once_leaves_nothing_behind() -> None:
    coalescer = Coalescer()

    def call() -> Awaitable[CachedResponse]:
        raise RuntimeError("could not even start")

    with pytest.raises(RuntimeError, match="could not even start"):
        await coalescer.run("k", call)
    assert len(coalescer) == 0


@settings(max_examples=60, deadline=None)
@given(
    plan=st.lists(
        st.sampled_from(["wait", "cancel_early", "cancel_late"]), min_size=1, max_size=12
    ),
    outcome=st.sampled_from(["ok", "error"]),
)
def test_no_mix_of_cancellations_leaks_an_entry(plan: list[str], outcome: str) -> None:
    asyncio.run(_run_plan(plan, outcome))


async def _run_plan(plan: list[str], outcome: str) -> None:
    coalescer, upstream = Coalescer(), Upstream()
    tasks = [asyncio.create_task(coalescer.run("k", upstream)) for _ in plan]

    def cancel(when: str) -> None:
        for task, step in zip(tasks, plan, strict=True):
            if step == when:
                task.cancel()

    cancel("cancel_early")
    await _settle()
    cancel("cancel_late")
    await _settle()
    if not upstream.release.done():
        if outcome == "ok":
            upstream.release.set_result(ANSWER)
        else:
            upstream.release.set_exception(ConnectionResetError("upstream closed"))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await _settle()
    waited = [r for r, p in zip(results, plan, strict=True) if p == "wait"]
    expected = (ANSWER, True) if outcome == "ok" else ConnectionResetError
    for result in waited:
        if outcome == "ok":
            assert result == expected or result == (ANSWER, False)
        else:
            assert isinstance(result, ConnectionResetError)
    assert upstream.calls <= 1
    assert len(coalescer) == 0
