"""Grants of an admit call that timed out are given back when a stalled Redis resumes.

A paused Redis (SIGSTOP) still holds the admit script in its socket buffer: when it
resumes it runs the script and grants slots nobody will settle. Before the fix those
slots (and their tokens) stayed taken for the whole lease TTL — and the callers had
been answered 503.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import redis

from proxy.admission import StoreUnavailable
from proxy.backend import RedisStore
from tests.support.admission_helpers import eventually, new_pool, per_min, plan
from tests.support.redis_fixtures import RedisServerProcess

Factory = Callable[..., RedisServerProcess]


async def test_grants_of_a_timed_out_admit_are_released_when_redis_resumes(
    redis_factory: Factory,
) -> None:
    server = redis_factory()
    assert server.proc is not None
    store = RedisStore(server.url, timeout_s=0.2)
    await store.start()
    # Long TTL: without the release the slots would stay taken for the whole test.
    p = plan(new_pool(), pool_concurrency=10, pool_tokens=per_min(60, 1000), lease_ttl_ms=120_000)
    inspect = redis.Redis.from_url(server.url)
    try:
        warm = await store.admit(p, 0)  # connections and scripts ready before the stall
        assert warm.admitted and warm.lease is not None
        store.settle(p, warm.lease, 0, 0)
        await store.flush()
        server.proc.send_signal(signal.SIGSTOP)
        try:
            results = await asyncio.gather(
                *(store.admit(p, 100) for _ in range(5)), return_exceptions=True
            )
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert all(isinstance(r, StoreUnavailable) for r in results), results

        def released() -> bool:
            return int(inspect.zcard(p.keys.pool_leases)) == 0 and not store._late

        await eventually(released, timeout_s=10)
        await store.flush()
        # The tokens came back too: the whole burst is available again at once.
        full = await store.admit(p, 1000)
        assert full.admitted, full
    finally:
        inspect.close()
        await store.close()
