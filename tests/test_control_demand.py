"""Refused demand reaches the controller, and retries go only into headroom (issue 9).

Real admission refusals (the Gate on a real Redis) are what the controller counts; the
controller's reaction is read back from the fleet's shared limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from proxy.admission.gate import Gate
from proxy.backend.store import RedisStore
from proxy.control.breaker import OPEN
from proxy.control.controller import Adaptivity
from proxy.errors import BedrockError
from proxy.metrics import Metrics
from proxy.policy import CompiledPolicy
from tests.support.admission_helpers import new_pool, shedding_policy, until


def _policy(pool: str) -> CompiledPolicy:
    adaptive = {"ceiling": 40, "initial": 4, "interval_seconds": 0.25, "target_p99_ms": 5000}
    breaker = {"window_seconds": 1, "min_requests": 20, "open_seconds": 5}
    return shedding_policy(
        pool,
        adaptive,
        breaker,
        priorities={"P0": {"share": 1.0}, "P2": {"share": 0.25}},
        workloads={
            "chat": {"priority": "P0", "limits": {pool: {"concurrency": 1}}},
            "browse": {"priority": "P2"},
        },
    )


Setup = tuple[str, CompiledPolicy, RedisStore, Adaptivity]


@pytest.fixture
async def setup(redis_server: Any) -> AsyncIterator[Setup]:
    pool = new_pool()
    policy = _policy(pool)
    store = RedisStore(redis_server.url)
    await store.start()
    a = Adaptivity(
        policy, store, redis_server.url, registry=CollectorRegistry(), tick_s=0.05, bucket_s=0.05
    )
    await a.start()
    try:
        yield pool, policy, store, a
    finally:
        await a.close()
        await store.close()


async def _refusal(gate: Gate, policy: CompiledPolicy, workload: str) -> BedrockError:
    """Admit calls of ``workload`` until the store refuses one; return that refusal."""
    wl = policy.workloads[workload]
    pool = next(iter(policy.pools.values()))
    plan = policy.plan(wl, pool, wl.priority)
    for _ in range(10):
        got = await gate.admit(wl, wl.priority, pool, plan, 10)
        if isinstance(got, BedrockError):
            return got
    raise AssertionError("never refused")


async def test_a_workload_cap_is_not_demand(setup: Setup) -> None:
    """More pool would not admit a call its own workload cap refused: the pool holds."""
    pool, policy, store, a = setup
    await until(lambda: a.limit(pool) == 4)
    refusal = await _refusal(Gate(store, Metrics()), policy, "chat")
    assert refusal.headers["RateLimit-Policy"].startswith('"workload.concurrency"')
    for _ in range(5):
        a.refused(pool, "P0", refusal)
    await asyncio.sleep(0.8)
    assert a.limit(pool) == 4  # 1 of 4 in flight and no demand: an idle pool holds


async def test_class_share_refusals_grow_the_pool(setup: Setup) -> None:
    """Incident 3: a class capped at 25 % of the limit never fills the pool, yet it grows."""
    pool, policy, store, a = setup
    await until(lambda: a.limit(pool) == 4)
    gate = Gate(store, Metrics())
    refusal = await _refusal(gate, policy, "browse")  # 1 slot of 4
    assert refusal.headers["RateLimit-Policy"].startswith('"class.concurrency"')
    a.refused(pool, "P2", refusal)

    async def keep_coming() -> None:  # 1 in flight + 5 refused a tick want more than 4
        while True:
            for _ in range(5):
                a.refused(pool, "P2", await _refusal(gate, policy, "browse"))
            await asyncio.sleep(0.05)

    callers = asyncio.create_task(keep_coming())
    try:
        # Slow start: doubled within an interval or two, though in-flight is 1 of 4.
        await until(lambda: (a.limit(pool) or 0) >= 8, timeout_s=3.0)
    finally:
        callers.cancel()
    assert a.metrics.underutilised.labels(pool)._value.get() == 0  # it moved: no alarm


async def test_retries_only_into_headroom(setup: Setup, redis_server: Any) -> None:
    pool, _, _, a = setup
    await until(lambda: a.limit(pool) == 4)
    assert a.retry_headroom(pool)  # nothing in flight
    client = redis.Redis.from_url(redis_server.url)
    expiry = (time.time() + 600) * 1000
    client.zadd(f"sluice:{{{pool}}}:leases", {f"fake{i}": expiry for i in range(4)})
    try:
        await until(lambda: not a.retry_headroom(pool))  # the fleet fills the limit
        started = time.monotonic()
        assert not await a.await_headroom(pool, 0.3)  # a class without a chain waits, in vain
        assert time.monotonic() - started >= 0.3

        async def free_one() -> None:
            await asyncio.sleep(0.2)
            client.zrem(f"sluice:{{{pool}}}:leases", "fake0")

        freeing = asyncio.create_task(free_one())
        assert await a.await_headroom(pool, 5.0)  # ...and retries once a slot frees
        await freeing
        for i in range(40):
            a.observe(pool, "P0", 100.0, i % 2 == 0, False)  # Bedrock throttles half
        await until(lambda: a.breakers.state(pool) == OPEN)
        assert not a.retry_headroom(pool)  # while open: no retries at all
        assert a.breaker_allows(pool)  # ...but nobody is refused by the breaker
    finally:
        client.close()
