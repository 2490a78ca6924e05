"""Grants of an admit call that timed out are given back when a stalled Redis resumes.

A paused Redis (SIGSTOP) still holds the admit script in its socket buffer: when it
resumes it runs the script and grants slots nobody will settle. Before the fix those
slots (and their tokens) stayed taken for the whole lease TTL — and the callers had
been answered 503.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable

import redis

from proxy.admission import StoreUnavailable
from proxy.backend.store import RedisStore
from tests.support.admission_helpers import eventually, new_pool, per_min, plan
from tests.support.hostile import Answer, send
from tests.support.hostile_cases import HAIKU, Case, converse_body, request
from tests.support.processes import Simulator, Sluice
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


def test_calls_answered_503_during_a_stall_leave_no_slot_behind(
    redis_factory: Factory, sim: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    """Through a real Sluice: the stall's 503s must not hold the pool's slots afterwards."""
    server = redis_factory()
    assert server.proc is not None
    policy = {
        "server": {"store_timeout_ms": 200, "lease_ttl_seconds": 120, "retry": {"max_retries": 0}},
        "identity": {"default_workload": "p2"},
        "models": {"haiku": {"ids": [HAIKU], "concurrency": 4}},
        "priorities": {"P2": {"share": 1.0, "on_store_failure": "closed"}},
        "workloads": {"p2": {"priority": "P2"}},
    }
    proxy = make_sluice(upstream=sim.url, policy=policy, redis_url=server.url)
    rng = random.Random(5)
    call = request("POST", f"/model/{HAIKU}/converse", converse_body(rng, 16))

    async def burst() -> list[Answer]:
        return await asyncio.gather(
            *(send("127.0.0.1", proxy.port, Case("c", call), 10, 10) for _ in range(4))
        )

    assert [a.status for a in asyncio.run(burst())] == [200] * 4  # warm
    server.proc.send_signal(signal.SIGSTOP)
    try:
        stalled = asyncio.run(burst())
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert [a.status for a in stalled] == [503] * 4
    # The pool's four slots are free again as soon as Redis answers: no 429 for 120 s.
    deadline = time.monotonic() + 5
    while (statuses := [a.status for a in asyncio.run(burst())]) != [200] * 4:
        assert time.monotonic() < deadline, statuses
        time.sleep(0.1)
