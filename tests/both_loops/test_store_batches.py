"""The store's batches without a task (:mod:`proxy.backend.batch_call`) keep every step
within one deadline, on asyncio's loop and uvloop, on real redis-server processes.

Found by review of the first version (f185fbd), where the callback path and the task path
met: the task path's timeout sent the next batch on the silent connection it had not yet
retired, and a NOSCRIPT resend started a whole new timeout (callers answered at ~2x).
Each test below failed on it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from proxy.admission import StoreUnavailable
from proxy.backend.store import RedisStore
from tests.support.admission_helpers import new_pool, per_min, plan
from tests.support.redis_fixtures import RedisServerProcess


class Relay:
    """Relays to Redis; the first connection to carry an EVALSHA lets ``let_through``
    EVALSHAs pass, then goes silent (no close, no reply). Connections opened later are fine."""

    def __init__(self, redis_port: int, let_through: int) -> None:
        self.redis_port = redis_port
        self.let_through = let_through
        self.victim: object | None = None
        self.conns = 0
        self.silenced = 0

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        me = object()
        self.conns += 1
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        seen = 0

        async def back() -> None:
            while data := await redis_r.read(65536):
                client_w.write(data)

        pump = asyncio.ensure_future(back())
        try:
            while data := await client_r.read(65536):
                if b"EVALSHA" in data and self.victim is None:
                    self.victim = me
                if self.victim is me and b"EVALSHA" in data:
                    seen += data.count(b"EVALSHA")
                    if seen > self.let_through:
                        self.silenced += data.count(b"EVALSHA")
                        continue
                redis_w.write(data)
        finally:
            pump.cancel()
            redis_w.close()
            client_w.close()

    async def start(self) -> tuple[asyncio.Server, int]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]


async def test_a_batch_that_connected_and_timed_out_sends_the_next_on_a_new_connection(
    redis_server: RedisServerProcess,
) -> None:
    """The first batch waits for the connection to be made, then the connection goes
    silent. At the timeout its callers are answered and the next batch goes on a new
    connection (a call unanswered at the timeout retires its connection)."""
    relay = Relay(redis_server.port, let_through=0)
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
        print(
            "\nfirst:",
            r1,
            "\nsecond:",
            r2,
            f"after {loop.time() - started:.3f}s more",
            "\nrelay conns:",
            relay.conns,
            "silenced EVALSHAs:",
            relay.silenced,
        )
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
    relay = Relay(redis_server.port, let_through=2)  # the warm admit and its settle pass
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
        print("\nD first:", r1, "second:", r2, "conns", relay.conns, "silenced", relay.silenced)
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
