"""No task per Redis call beyond the batch's own (issue 12: "no per-request task creation
that can be avoided"), on a real redis-server.

At low load every request is a batch of one, so each layer that wrapped a Redis call in a
task of its own (redis-py's ``wait_for`` around a write under a socket timeout, a shielded
task to outlive the admit's timeout) cost a task, and two loop iterations, per request.
What is left: the admit batch's task and the settle batch's, each running its call inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Generator
from contextlib import contextmanager
from typing import Any

from redis.asyncio import Redis

from proxy.admission import AdmitPlan, StoreUnavailable
from proxy.backend.direct import DirectCalls
from proxy.backend.store import RedisStore
from tests.support.admission_helpers import eventually, new_pool, per_min, plan
from tests.support.redis_fixtures import RedisServerProcess
from tests.support.relays import SilentRelay


@contextmanager
def counted_tasks() -> Generator[list[str], None, None]:
    """The names of the coroutines the running loop makes tasks of, while inside."""
    loop = asyncio.get_running_loop()
    made: list[str] = []
    before = loop.get_task_factory()

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kw: Any
    ) -> asyncio.Task[Any]:
        made.append(getattr(coro, "__qualname__", repr(coro)))
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        yield made
    finally:
        loop.set_task_factory(before)


async def _warm(store: RedisStore, p: AdmitPlan) -> None:
    """One request admitted and settled: the store's connections and scripts are ready."""
    warm = await store.admit(p, 1)
    assert warm.lease is not None
    store.settle(p, warm.lease, 1, 1)
    await store.flush()


async def test_a_direct_call_makes_no_task(redis_server: RedisServerProcess) -> None:
    client = Redis.from_url(redis_server.url)  # redis-py 8: a 5 s socket timeout by default
    direct = DirectCalls(client)
    try:
        sha = await client.script_load("return ARGV[1]")
        assert await direct.evalsha(sha, [], ["warm"]) == b"warm"  # connected
        with counted_tasks() as made:
            for i in range(20):
                assert await direct.evalsha(sha, [], [i]) == str(i).encode()
        assert made == []
    finally:
        await direct.aclose()
        await client.aclose()


async def test_a_request_makes_no_task_its_batches_are_answered_by_callbacks(
    redis_server: RedisServerProcess,
) -> None:
    """Once the connection is made and the scripts loaded, an admit batch and a settle
    batch are written at once and answered by a done-callback: no task per request (two
    before, one per batch: each cost 1.2-1.5 us more than a callback on uvloop)."""
    store = RedisStore(redis_server.url, timeout_s=1.0)
    await store.start()
    p = plan(new_pool(), pool_concurrency=10, pool_tokens=per_min(600, 1000))
    try:
        await _warm(store, p)
        with counted_tasks() as made:
            for _ in range(10):
                decision = await store.admit(p, 1)
                assert decision.admitted and decision.lease is not None
                store.settle(p, decision.lease, 1, 1)
                await store.flush()
        assert made == []
        assert int(await store._client.zcard(p.keys.pool_leases)) == 0  # every settle applied
    finally:
        await store.close()


async def test_with_no_connection_yet_a_batch_is_sent_by_a_task(
    redis_server: RedisServerProcess,
) -> None:
    """The connection is made by an awaited call: a batch that finds none makes it in a
    task, then is written and answered like the others (the settle after it: no task)."""
    store = RedisStore(redis_server.url, timeout_s=1.0)
    await store.start()
    p = plan(new_pool(), pool_concurrency=10, pool_tokens=per_min(600, 1000))
    try:
        with counted_tasks() as made:
            decision = await store.admit(p, 1)
            assert decision.admitted and decision.lease is not None
            store.settle(p, decision.lease, 1, 1)
            await store.flush()
        # (and redis-py's own tasks of the handshake)
        assert made[:2] == ["BatchCall._prepare", "DirectCalls._take_over"], made
        assert made.count("BatchCall._prepare") == 1 and not any("Store" in m for m in made)
    finally:
        await store.close()


async def test_a_timed_out_admit_answers_on_time_and_the_queue_goes_on(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """At the timeout an admit's callers are answered and the next batch is sent (on a new
    connection, made in a task: the first was written at once and answered by callbacks)
    while the first still waits; when Redis resumes the late grant goes back, and closing
    the store cancels nothing still needed."""
    server = redis_factory()
    assert server.proc is not None
    store = RedisStore(server.url, timeout_s=0.2)
    await store.start()
    p = plan(new_pool(), pool_concurrency=10, pool_tokens=per_min(600, 1000))
    loop = asyncio.get_running_loop()
    try:
        await _warm(store, p)
        server.proc.send_signal(signal.SIGSTOP)
        try:
            started = loop.time()
            with counted_tasks() as made:
                first = asyncio.ensure_future(store.admit(p, 1))
                await asyncio.sleep(0.05)
                second = asyncio.ensure_future(store.admit(p, 1))  # queued behind the first
                results = await asyncio.gather(first, second, return_exceptions=True)
            took = loop.time() - started
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        assert made.count("BatchCall._prepare") == 1, made  # the second batch only
        # Each waited one timeout (0.2 s), the second from when the first timed out: not
        # the first's late reply, which needed the SIGCONT.
        assert took < 1.0, took
        await eventually(lambda: not store._late, timeout_s=10)
        ok = await store.admit(p, 1)
        assert ok.admitted
    finally:
        await store.close()


async def test_flush_and_close_do_not_wait_for_a_late_reply(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """An admit that times out while a flush (or close) waits: they go on at its timeout,
    not when its late reply comes or the late bound ends (a SIGTERM during a Redis stall)."""
    server = redis_factory()
    assert server.proc is not None
    store = RedisStore(server.url, timeout_s=0.2)
    await store.start()
    p = plan(new_pool(), pool_concurrency=10, pool_tokens=per_min(600, 1000))
    loop = asyncio.get_running_loop()
    try:
        await _warm(store, p)
        server.proc.send_signal(signal.SIGSTOP)
        try:
            waiting = asyncio.ensure_future(store.admit(p, 1))
            await asyncio.sleep(0.05)  # written; Redis is stopped
            started = loop.time()
            await store.flush()
            flushed = loop.time() - started
            await store.close()
            closed = loop.time() - started
            assert isinstance((await asyncio.gather(waiting, return_exceptions=True))[0], Exception)
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert flushed < 1.0 and closed < 1.5, (flushed, closed)  # not the 5 s late bound
    finally:
        await store.close()


async def test_a_stall_past_the_socket_timeout_still_bounds_every_call_by_the_store_timeout(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """Redis stalls longer than the connection's socket timeout (which drops the
    connection): a settle's flush and the store's close still take about one store
    timeout, connecting again included, not a connect attempt per queued call."""
    server = redis_factory()
    assert server.proc is not None
    store = RedisStore(server.url + "?socket_timeout=0.5", timeout_s=0.2)
    await store.start()
    p = plan(new_pool(), pool_concurrency=10, pool_tokens=per_min(600, 1000))
    loop = asyncio.get_running_loop()
    try:
        await _warm(store, p)
        granted = await store.admit(p, 1)
        assert granted.lease is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            with contextlib.suppress(StoreUnavailable):
                await store.admit(p, 1)
            await asyncio.sleep(0.8)  # past the socket timeout: the connection is dropped
            store.settle(p, granted.lease, 1, 1)
            started = loop.time()
            await store.flush()
            flushed = loop.time() - started
            await store.close()
            closed = loop.time() - started
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert flushed < 0.6 and closed < 1.2, (flushed, closed)
        assert store.settle_failures == 1  # counted, not lost without a word
    finally:
        await store.close()


def test_a_late_reply_is_waited_for_as_long_as_the_urls_socket_timeout(
    redis_server: RedisServerProcess,
) -> None:
    from proxy.backend.client import redis_client
    from proxy.backend.runner import LATE_BOUND_S, ScriptRunner

    def bound(url: str) -> float:
        runner = ScriptRunner(redis_client(url, 0.2), ["admit"], 0.2, logging.getLogger("t"))
        return runner._late_bound

    assert bound(redis_server.url) == LATE_BOUND_S  # redis-py's default socket timeout
    assert bound(redis_server.url + "?socket_timeout=30") == 30.0
    # Shorter than the store timeout: each call ends at its socket timeout anyway.
    assert bound(redis_server.url + "?socket_timeout=0.1") == 0.2


async def test_without_poll_a_closed_idle_connection_is_still_replaced(
    redis_factory: Callable[..., RedisServerProcess], monkeypatch: Any
) -> None:
    """Where ``select.poll`` does not exist (Windows) the socket check is skipped: a
    connection the server closed fails its write and the call goes to a new one."""
    import proxy.backend.direct as direct_module

    monkeypatch.setattr(direct_module, "_POLL", None)
    server = redis_factory()
    client = Redis.from_url(server.url)
    direct = DirectCalls(client)
    try:
        sha = await client.script_load("return ARGV[1]")
        assert await direct.evalsha(sha, [], ["a"]) == b"a"
        await asyncio.to_thread(server.restart)  # the loop reads the close meanwhile
        await client.script_load("return ARGV[1]")
        assert await direct.evalsha(sha, [], ["b"]) == b"b"
    finally:
        await direct.aclose()
        await client.aclose()


async def test_a_late_admit_is_not_written_when_connecting_outlasts_the_timeout(
    redis_server: RedisServerProcess, monkeypatch: Any
) -> None:
    """``run_past`` connecting: past the store timeout its callers were answered, so the
    script is not sent at all (it would take grants nobody holds); connected in time, it is
    sent and its reply waited for past the timeout (its grants are then given back)."""
    from proxy.backend.client import redis_client
    from proxy.backend.runner import ScriptRunner

    script = (
        "local function ms() local t = redis.call('TIME') return t[1] * 1000 + t[2] / 1000 end"
        " local stop = ms() + tonumber(ARGV[1]) while ms() < stop do end"
        " return redis.call('INCR', KEYS[1])"
    )
    monkeypatch.setattr("proxy.backend.runner.load_script", lambda name: script)
    delay = [0.0]
    take_over = DirectCalls._take_over

    async def slow_take_over(self: DirectCalls) -> Any:
        await asyncio.sleep(delay[0])  # a connect that takes this long (Redis coming back)
        return await take_over(self)

    monkeypatch.setattr(DirectCalls, "_take_over", slow_take_over)
    admin = Redis.from_url(redis_server.url)
    loop = asyncio.get_running_loop()
    for connect_s, busy_ms, sent in ((0.5, 0, False), (0.05, 400, True)):
        url = redis_server.url + "?socket_timeout=2"
        runner = ScriptRunner(redis_client(url, 0.25), ["admit"], 0.25, logging.getLogger("t"))
        await runner.start()
        await admin.delete("granted")
        delay[0] = connect_s
        told: list[float] = []
        started = loop.time()
        try:
            reply = await runner.run_past(
                "admit",
                ["granted"],
                [busy_ms],
                lambda e, told=told, started=started: told.append(loop.time() - started),
            )
        except StoreUnavailable:
            reply = None
        took = loop.time() - started
        await asyncio.sleep(0.1)
        assert len(told) == 1 and 0.2 < told[0] < 0.4, told  # callers answered on time
        if sent:
            assert reply == 1 and took > 0.4  # waited for the late reply
            assert await admin.get("granted") == b"1"
        else:
            assert reply is None and took < 0.45
            assert await admin.get("granted") is None  # never written
        await runner.aclose()
    await admin.aclose()


async def test_a_late_admit_on_a_silent_connection_sends_the_next_batch_on_a_new_one(
    redis_server: RedisServerProcess, monkeypatch: Any
) -> None:
    """The connection goes silent without a sign (a NAT or balancer dropped it): the admit
    on it is answered at the store timeout, and the next admit goes to a new connection and
    is answered, instead of every admit failing until the socket timeout."""
    from proxy.backend.client import redis_client
    from proxy.backend.runner import ScriptRunner

    relay = SilentRelay(redis_server.port)
    monkeypatch.setattr("proxy.backend.runner.load_script", lambda name: "return 1")
    proxy, port = await relay.start()
    url = f"redis://127.0.0.1:{port}/0?socket_timeout=5"
    runner = ScriptRunner(redis_client(url, 0.2), ["admit"], 0.2, logging.getLogger("t"))
    await runner.start()
    loop = asyncio.get_running_loop()
    told: list[Exception] = []
    try:
        assert await runner.run_past("admit", [], [], told.append) == 1
        silent = asyncio.ensure_future(runner.run_past("admit", [], [], told.append))
        await asyncio.sleep(0.3)
        assert len(told) == 1  # answered at the store timeout
        started = loop.time()
        assert await runner.run_past("admit", [], [], told.append) == 1
        assert loop.time() - started < 0.2 and len(told) == 1
        assert len(relay.after) == 1  # one new connection
        runner.abandon()
        await asyncio.gather(silent, return_exceptions=True)
    finally:
        await runner.aclose()
        proxy.close()


async def test_after_noscript_a_late_admit_is_sent_again_only_within_the_timeout(
    redis_server: RedisServerProcess, monkeypatch: Any
) -> None:
    """NOSCRIPT (a restart, a failover) on an admit: the script is reloaded and the admit
    sent again while its callers still wait; a reload that outlasts the timeout sends
    nothing (the callers were answered: grants taken now would be held by nobody)."""
    from proxy.backend.client import redis_client
    from proxy.backend.runner import ScriptRunner

    script = "return redis.call('INCR', KEYS[1])"
    monkeypatch.setattr("proxy.backend.runner.load_script", lambda name: script)
    admin = Redis.from_url(redis_server.url)
    for reload_s, sent in ((0.0, True), (0.4, False)):
        runner = ScriptRunner(
            redis_client(redis_server.url, 0.25), ["admit"], 0.25, logging.getLogger("t")
        )
        await runner.start()
        await admin.delete("granted")
        await admin.script_flush()
        load = runner._load

        async def slow_load(load: Any = load, reload_s: float = reload_s) -> None:
            await asyncio.sleep(reload_s)
            await load()

        monkeypatch.setattr(runner, "_load", slow_load)
        told: list[Exception] = []
        try:
            reply = await runner.run_past("admit", ["granted"], [], told.append)
        except StoreUnavailable:
            reply = None
        await asyncio.sleep(0.1)
        if sent:
            assert reply == 1 and not told
            assert await admin.get("granted") == b"1"
        else:
            assert reply is None and len(told) == 1
            assert await admin.get("granted") is None
        await runner.aclose()
    await admin.aclose()
