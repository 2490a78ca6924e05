"""The store's batches without a task (:mod:`proxy.backend.batch_call`) keep every step
within one deadline, on asyncio's loop and uvloop, on real redis-server processes.

Found by review of the first version (f185fbd), where the callback path and the task path
met: the task path's timeout sent the next batch on the silent connection it had not yet
retired, and a NOSCRIPT resend started a whole new timeout (callers answered at ~2x).
Each test below failed on it."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from proxy.admission import StoreUnavailable
from proxy.backend.store import RedisStore
from tests.support.admission_helpers import new_pool, per_min, plan
from tests.support.redis_fixtures import RedisServerProcess
from tests.support.relays import SilentRelay


async def test_a_batch_that_connected_and_timed_out_sends_the_next_on_a_new_connection(
    redis_server: RedisServerProcess,
) -> None:
    """The first batch waits for the connection to be made, then the connection goes
    silent. At the timeout its callers are answered and the next batch goes on a new
    connection (a call unanswered at the timeout retires its connection)."""
    relay = SilentRelay(redis_server.port, let_through=0)
    proxy, port = await relay.start()
    store = RedisStore(f"redis://127.0.0.1:{port}/0?socket_timeout=5", timeout_s=0.2)
    await store.start()
    p = plan(new_pool(), pool_concurrency=10, pool_tokens=per_min(600, 1000))
    loop = asyncio.get_running_loop()
    try:
        first = asyncio.ensure_future(store.admit(p, 1))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(store.admit(p, 1))  # queued behind the first
        r1 = await asyncio.gather(first, return_exceptions=True)
        started = loop.time()
        r2 = await asyncio.gather(second, return_exceptions=True)
        took = loop.time() - started
        print(f"\nfirst: {r1}\nsecond: {r2} after {took:.3f}s more; new connections:", relay.after)
        assert isinstance(r1[0], StoreUnavailable)
        assert not isinstance(r2[0], BaseException) and r2[0].admitted, r2
    finally:
        store._runner.abandon()
        await store.close()
        proxy.close()


async def test_a_noscript_resend_of_an_admit_keeps_its_first_deadline(
    redis_factory: Callable[..., RedisServerProcess], monkeypatch: Any
) -> None:
    """NOSCRIPT comes back late (Redis was busy) and the reload is slow: the callers must
    still be answered at the store timeout counted from the send (run_past's contract),
    not a whole second timeout after the NOSCRIPT."""
    server = redis_factory()
    assert server.proc is not None
    store = RedisStore(server.url, timeout_s=0.25)
    await store.start()
    p = plan(new_pool(), pool_concurrency=10, pool_tokens=per_min(600, 1000))
    loop = asyncio.get_running_loop()
    admin = Redis.from_url(server.url)
    try:
        warm = await store.admit(p, 1)  # connection made: the callback path
        store.settle(p, warm.lease, 1, 1)
        await store.flush()
        await admin.script_flush()
        load = store._runner._load

        async def slow_load() -> None:
            await asyncio.sleep(0.5)
            await load()

        monkeypatch.setattr(store._runner, "_load", slow_load)
        server.proc.send_signal(signal.SIGSTOP)
        started = loop.time()
        call = asyncio.ensure_future(store.admit(p, 1))
        await asyncio.sleep(0.2)
        server.proc.send_signal(signal.SIGCONT)  # NOSCRIPT at ~0.2 s
        res = await asyncio.gather(call, return_exceptions=True)
        took = loop.time() - started
        print(f"\nanswered after {took:.3f}s (store timeout 0.25s):", res)
        assert took < 0.35, took
    finally:
        server.proc.send_signal(signal.SIGCONT)
        await admin.aclose()
        await store.close()


async def test_a_noscript_resend_of_a_settle_keeps_its_first_deadline(
    redis_factory: Callable[..., RedisServerProcess], monkeypatch: Any
) -> None:
    """Same for a confirmed settle: it is released (or counted lost) within the timeout."""
    server = redis_factory()
    assert server.proc is not None
    store = RedisStore(server.url, timeout_s=0.25)
    await store.start()
    p = plan(new_pool(), pool_concurrency=10, pool_tokens=per_min(600, 1000))
    loop = asyncio.get_running_loop()
    admin = Redis.from_url(server.url)
    try:
        warm = await store.admit(p, 1)
        d = await store.admit(p, 1)
        store.settle(p, warm.lease, 1, 1)
        await store.flush()
        await admin.script_flush()
        load = store._runner._load

        async def slow_load() -> None:
            await asyncio.sleep(0.5)
            await load()

        monkeypatch.setattr(store._runner, "_load", slow_load)
        server.proc.send_signal(signal.SIGSTOP)
        started = loop.time()
        done = store.settle(p, d.lease, 1, 1, confirm=True)
        await asyncio.sleep(0.2)
        server.proc.send_signal(signal.SIGCONT)
        await done
        took = loop.time() - started
        print(f"\nconfirm released after {took:.3f}s (timeout 0.25s); lost:", store.settle_failures)
        assert took < 0.35, took
    finally:
        server.proc.send_signal(signal.SIGCONT)
        await admin.aclose()
        await store.close()


async def test_a_batch_written_at_once_that_timed_out_sends_the_next_on_a_new_connection(
    redis_server: RedisServerProcess,
) -> None:
    """The same with the first batch written at once on a warm connection that then goes
    silent: the next batch goes on a new connection and is admitted."""
    relay = SilentRelay(redis_server.port, let_through=2)  # the warm admit and its settle pass
    proxy, port = await relay.start()
    store = RedisStore(f"redis://127.0.0.1:{port}/0?socket_timeout=5", timeout_s=0.2)
    await store.start()
    p = plan(new_pool(), pool_concurrency=10, pool_tokens=per_min(600, 1000))
    try:
        warm = await store.admit(p, 1)
        store.settle(p, warm.lease, 1, 1)
        await store.flush()
        first = asyncio.ensure_future(store.admit(p, 1))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(store.admit(p, 1))
        r1, r2 = await asyncio.gather(first, second, return_exceptions=True)
        print("\nfirst:", r1, "second:", r2, "connections after the silent one", len(relay.after))
        assert isinstance(r1, StoreUnavailable)
        assert not isinstance(r2, BaseException) and r2.admitted, r2
    finally:
        store._runner.abandon()
        await store.close()
        proxy.close()


async def test_a_failure_report_that_raises_still_releases_the_confirms(
    redis_factory: Callable[..., RedisServerProcess], monkeypatch: Any
) -> None:
    """Hardening (an artificial trigger): if reporting a lost settle raises, its confirms
    are still released and the queue goes on (flush would spin for ever otherwise)."""
    server = redis_factory()
    assert server.proc is not None
    store = RedisStore(server.url, timeout_s=0.2)
    await store.start()
    p = plan(new_pool(), pool_concurrency=10, pool_tokens=per_min(600, 1000))
    try:
        warm = await store.admit(p, 1)
        d = await store.admit(p, 1)
        store.settle(p, warm.lease, 1, 1)
        await store.flush()

        def boom(*a: Any) -> None:
            raise RuntimeError("report failed")

        monkeypatch.setattr(store, "_settle_lost", boom)
        server.proc.send_signal(signal.SIGSTOP)
        done = store.settle(p, d.lease, 1, 1, confirm=True)
        try:
            await asyncio.wait_for(asyncio.shield(done), 1.0)
            released = True
        except TimeoutError:
            released = False
        q = store._queues[p.scope]
        print("\nconfirm released:", released, "settle_busy:", q.settle_busy)
        assert released
    finally:
        server.proc.send_signal(signal.SIGCONT)
        monkeypatch.undo()
        await store.close()


async def test_a_batch_whose_arguments_cannot_be_sent_is_answered_at_once(
    redis_server: RedisServerProcess,
) -> None:
    """A second review (be8833f): such a batch made a task a loop turn until the timeout
    (16,000-20,000 of them) and was answered with TimeoutError; now with the error, at once."""
    store = RedisStore(redis_server.url, timeout_s=0.25)
    await store.start()
    p = plan(new_pool(), pool_concurrency=10)
    loop = asyncio.get_running_loop()
    made = 0
    factory = loop.get_task_factory()

    def count(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        nonlocal made
        made += 1
        return asyncio.Task(coro, loop=loop, **kw)

    try:
        warm = await store.admit(p, 1)
        assert warm.lease is not None
        store.settle(p, warm.lease, 1, 1)
        await store.flush()
        loop.set_task_factory(count)  # type: ignore[arg-type]
        started = loop.time()
        bad = store.admit(p, None)  # type: ignore[arg-type]
        res = await asyncio.gather(bad, return_exceptions=True)
        took = loop.time() - started
        loop.set_task_factory(factory)
        assert isinstance(res[0], StoreUnavailable) and "DataError" in str(res[0]), res
        assert took < 0.05 and made < 5, (took, made)
        assert (await store.admit(p, 1)).admitted  # the queue goes on
    finally:
        loop.set_task_factory(factory)
        await store.close()


async def _written(store: RedisStore) -> None:
    """Until the batch is on the wire."""
    for _ in range(50):
        direct = store._runner._direct
        assert direct is not None
        if direct._pipe is not None and direct._pipe.waiting:
            return
        await asyncio.sleep(0)
    raise AssertionError("never written")


async def test_a_reply_that_came_in_time_wins_over_a_loop_that_ran_late(
    redis_server: RedisServerProcess,
) -> None:
    """The loop stalls past the timeout (GC, a busy CPU) while Redis's replies are in the
    socket: the settle is applied, not counted lost; the admit is delivered."""
    store = RedisStore(redis_server.url, timeout_s=0.2)
    await store.start()
    p = plan(new_pool(), pool_concurrency=10)
    try:
        warm = await store.admit(p, 1)
        assert warm.lease is not None
        store.settle(p, warm.lease, 1, 1)
        await store.flush()
        d = await store.admit(p, 1)
        assert d.lease is not None
        done = store.settle(p, d.lease, 1, 1, confirm=True)
        assert done is not None
        await _written(store)
        time.sleep(0.3)  # noqa: ASYNC251 (the point: the loop stalls; Redis answers meanwhile)
        await done
        assert store.settle_failures == 0
        assert not await store.holds_lease(p.pool, d.lease)
        call = asyncio.ensure_future(store.admit(p, 1))
        await _written(store)
        time.sleep(0.3)  # noqa: ASYNC251
        admitted = await call
        assert admitted.admitted
    finally:
        await store.close()


async def test_close_during_a_stall_does_not_wait_for_releases_that_cannot_land(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """Leases of settles lost to a stall are released again every 0.5 s; closing the store
    drops them (they expire with their TTL) instead of waiting a timeout per 256 leases."""
    server = redis_factory()
    assert server.proc is not None
    store = RedisStore(server.url, timeout_s=0.2)
    await store.start()
    p = plan(new_pool(), pool_concurrency=100_000)
    loop = asyncio.get_running_loop()
    try:
        granted = await asyncio.gather(*(store.admit(p, 1) for _ in range(4000)))
        server.proc.send_signal(signal.SIGSTOP)
        for d in granted:
            assert d.lease is not None
            store.settle(p, d.lease, 1, 1)
        await store.flush()
        assert store.settle_failures == 4000
        await asyncio.sleep(0.6)  # a release is under way
        started = loop.time()
        await asyncio.wait_for(store.close(), 20)
        took = loop.time() - started
        assert took < 0.5, took  # 0.9-1.1 s before
    finally:
        server.proc.send_signal(signal.SIGCONT)
        await store.close()
