"""The admission behaviour suite, run on every backend: embedded, Redis, 3-master Cluster.

Every test states one contract of :class:`proxy.admission.Store`; the same assertions on
the embedded store (pure Python) and on Redis (Lua) prove the two implementations agree.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.admission import AdmitPlan, Decision, Store
from proxy.backend.store import EmbeddedStore, open_store
from tests.support.admission_helpers import Backend, dump_state, new_pool, per_min, plan

StoreFactory = Callable[[], Awaitable[Store]]


@pytest.fixture
async def stores(backend: Backend) -> AsyncIterator[StoreFactory]:
    """``await stores()`` -> a started store; on embedded always the same one instance."""
    made: list[Store] = []

    async def make() -> Store:
        if not backend.shared and made:
            return made[0]
        store = open_store(backend.url)
        await store.start()
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


async def admit_many(store: Store, p: AdmitPlan, n: int, tokens: int = 0) -> list[Decision]:
    return list(await asyncio.gather(*(store.admit(p, tokens) for _ in range(n))))


# --- buckets -------------------------------------------------------------------------


async def test_hundred_hits_at_limit_five_admit_exactly_five(stores: StoreFactory) -> None:
    store = await stores()
    p = plan(new_pool(), pool_requests=per_min(5, 5))
    decisions = await admit_many(store, p, 100)
    assert sum(d.admitted for d in decisions) == 5
    refused = [d for d in decisions if not d.admitted]
    assert {d.refused_by for d in refused} == {"pool.requests_per_minute"}


async def test_hot_key_from_several_instances_never_over_grants(
    stores: StoreFactory, backend: Backend
) -> None:
    instances = [await stores() for _ in range(4)]
    rate_per_min, burst = 600.0, 50
    p = plan(new_pool(), pool_requests=per_min(rate_per_min, burst))
    start = time.monotonic()
    results = await asyncio.gather(*(admit_many(s, p, 60) for s in instances))
    elapsed = time.monotonic() - start
    admitted = sum(d.admitted for r in results for d in r)
    ceiling = burst + math.floor(rate_per_min / 60 * elapsed)
    assert burst <= admitted <= ceiling, (admitted, ceiling, elapsed)


async def test_refusal_retry_after_points_at_refill(stores: StoreFactory) -> None:
    store = await stores()
    p = plan(new_pool(), pool_requests=per_min(60, 2))  # one request per second
    assert all(d.admitted for d in await admit_many(store, p, 2))
    d = await store.admit(p, 0)
    assert not d.admitted and d.refused_by == "pool.requests_per_minute"
    assert 0 < d.retry_after_ms <= 1001
    assert d.retry_after_ms > 900  # the bucket was emptied a few ms ago
    await asyncio.sleep(d.retry_after_ms / 1000 + 0.02)
    assert (await store.admit(p, 0)).admitted


async def test_oversized_cost_needs_a_full_bucket_and_leaves_debt(stores: StoreFactory) -> None:
    store = await stores()
    p = plan(new_pool(), pool_tokens=per_min(60_000, 1000))  # 1000 tokens/s
    big = await store.admit(p, 2500)
    assert big.admitted and big.remaining_tokens == 0
    d = await store.admit(p, 10)
    assert not d.admitted and d.refused_by == "pool.tokens_per_minute"
    # level is -1500: 1510 tokens short at 1 token/ms
    assert 1400 <= d.retry_after_ms <= 1511


async def test_tokens_settled_low_are_refunded(stores: StoreFactory) -> None:
    store = await stores()
    p = plan(new_pool(), pool_tokens=per_min(60, 10_000), workload_tokens=per_min(60, 5000))
    d = await store.admit(p, 4000)
    assert d.admitted and d.remaining_tokens == 1000
    assert d.lease is not None
    store.settle(p, d.lease, 4000, 500)
    await store.flush()
    after = await store.admit(p, 0)
    assert after.remaining_tokens == 4500  # workload bucket: 5000 - 500


async def test_tokens_settled_high_become_debt_that_blocks(stores: StoreFactory) -> None:
    store = await stores()
    p = plan(new_pool(), workload_tokens=per_min(600, 1000))  # 10 tokens/s
    d = await store.admit(p, 500)
    assert d.admitted and d.lease is not None
    store.settle(p, d.lease, 500, 1600)
    await store.flush()
    refused = await store.admit(p, 1)
    assert not refused.admitted and refused.refused_by == "workload.tokens_per_minute"
    assert refused.retry_after_ms >= 60_000  # 601 tokens of debt at 10/s


async def test_refund_never_lifts_a_bucket_above_full(stores: StoreFactory) -> None:
    store = await stores()
    p = plan(new_pool(), pool_tokens=per_min(60, 1000))
    d = await store.admit(p, 100)
    assert d.lease is not None
    store.settle(p, d.lease, 100, -5000)  # absurd refund
    await store.flush()
    assert (await store.admit(p, 0)).remaining_tokens == 1000


async def test_tokens_per_window_stay_under_limit_plus_one_reservation(
    stores: StoreFactory,
) -> None:
    store = await stores()
    rate, burst, reservation = 2000.0, 500.0, 200
    p = plan(new_pool(), pool_tokens=per_min(rate * 60, burst))
    used = 0
    stop = time.monotonic() + 1.2
    rng = random.Random(7)

    async def client() -> None:
        nonlocal used
        while time.monotonic() < stop:
            d = await store.admit(p, reservation)
            if d.admitted:
                assert d.lease is not None
                actual = rng.randint(0, reservation)
                used += actual
                store.settle(p, d.lease, reservation, actual)
            else:
                await asyncio.sleep(min(d.retry_after_ms, 20) / 1000)

    start = time.monotonic()
    await asyncio.gather(*(client() for _ in range(20)))
    elapsed = time.monotonic() - start
    assert used <= burst + rate * elapsed + reservation
    assert used >= rate * elapsed * 0.5  # and the limiter did let traffic through


# --- concurrency ---------------------------------------------------------------------


async def test_concurrency_cap_is_never_exceeded(stores: StoreFactory, backend: Backend) -> None:
    instances = [await stores() for _ in range(3)]
    cap = 5
    p = plan(new_pool(), pool_concurrency=cap, workload_concurrency=100)
    holding = peak = done = 0

    async def client(store: Store) -> None:
        nonlocal holding, peak, done
        while True:
            d = await store.admit(p, 0)
            if d.admitted:
                break
            await asyncio.sleep(0.002)
        holding += 1
        peak = max(peak, holding)
        assert d.lease is not None
        await asyncio.sleep(0.005)
        holding -= 1
        store.settle(p, d.lease, 0, 0)
        done += 1

    await asyncio.gather(*(client(instances[i % 3]) for i in range(60)))
    assert done == 60 and peak <= cap
    for s in instances:
        await s.flush()
    stats = await instances[0].pool_stats(p.pool)
    assert stats["in_flight"] == 0


async def test_settle_frees_a_slot(stores: StoreFactory) -> None:
    store = await stores()
    p = plan(new_pool(), workload_concurrency=1)
    first = await store.admit(p, 0)
    second = await store.admit(p, 0)
    assert first.admitted and not second.admitted
    assert second.refused_by == "workload.concurrency"
    assert 50 <= second.retry_after_ms <= 1000
    assert first.lease is not None
    store.settle(p, first.lease, 0, 0)
    await store.flush()
    assert (await store.admit(p, 0)).admitted


async def test_cancelled_admit_gives_its_slot_back(stores: StoreFactory) -> None:
    store = await stores()
    p = plan(new_pool(), pool_concurrency=1)
    task = asyncio.ensure_future(store.admit(p, 0))
    await asyncio.sleep(0)  # queued (Redis) or already decided (embedded)
    task.cancel()
    try:
        d = await task
    except asyncio.CancelledError:
        pass
    else:  # the embedded store decided before the cancel could land
        assert d.lease is not None
        store.settle(p, d.lease, 0, 0)
    await asyncio.sleep(0.05)
    await store.flush()
    assert (await store.admit(p, 0)).admitted


async def test_heartbeat_keeps_a_long_lease_alive(stores: StoreFactory) -> None:
    store = await stores()
    p = plan(new_pool(), pool_concurrency=1, lease_ttl_ms=600)
    held = await store.admit(p, 0)
    assert held.admitted and held.lease is not None
    await asyncio.sleep(1.5)  # 2.5 TTLs
    assert not (await store.admit(p, 0)).admitted
    store.settle(p, held.lease, 0, 0)
    await store.flush()
    assert (await store.admit(p, 0)).admitted


async def test_dynamic_limit_lowers_and_clears(stores: StoreFactory) -> None:
    store = await stores()
    p = plan(new_pool(), pool_concurrency=10)
    await store.set_pool_limit(p.pool, 2)
    decisions = await admit_many(store, p, 4)
    assert sum(d.admitted for d in decisions) == 2
    assert decisions[-1].refused_by == "pool.concurrency" and decisions[-1].limit == 2
    assert (await store.pool_stats(p.pool))["dynamic_limit"] == 2
    await store.set_pool_limit(p.pool, None)
    assert (await store.admit(p, 0)).admitted
    assert (await store.pool_stats(p.pool))["dynamic_limit"] == -1


# --- all-or-nothing and priorities ----------------------------------------------------


async def test_denial_by_one_limit_changes_no_counter(
    stores: StoreFactory, backend: Backend
) -> None:
    store = await stores()
    pool = new_pool()
    p = plan(
        pool,
        pool_requests=per_min(1, 100),
        pool_tokens=per_min(1, 10_000),
        pool_concurrency=50,
        workload_requests=per_min(1, 100),
        workload_tokens=per_min(1, 10_000),
        workload_concurrency=2,
    )
    assert all(d.admitted for d in await admit_many(store, p, 2, tokens=100))
    before = dump_state(backend, store, pool)
    refused = await store.admit(p, 100)
    assert refused.refused_by == "workload.concurrency"
    tokens_refused = await store.admit(plan(pool, pool_tokens=per_min(1, 10_000)), 50_000)
    assert not tokens_refused.admitted
    assert dump_state(backend, store, pool) == before


async def test_lower_class_cannot_take_the_reserved_concurrency(stores: StoreFactory) -> None:
    store = await stores()
    pool = new_pool()
    p2 = plan(pool, "browse", "P2", share=0.6, pool_concurrency=10)
    p0 = plan(pool, "checkout", "P0", share=1.0, pool_concurrency=10)
    flood = await admit_many(store, p2, 30)
    assert sum(d.admitted for d in flood) == 6
    assert {d.refused_by for d in flood if not d.admitted} == {"class.concurrency"}
    critical = await admit_many(store, p0, 5)
    assert sum(d.admitted for d in critical) == 4
    assert critical[-1].refused_by == "pool.concurrency"


async def test_lower_class_keeps_bucket_headroom_for_higher(stores: StoreFactory) -> None:
    store = await stores()
    pool = new_pool()
    batch = plan(pool, "enrich", "batch", share=0.4, pool_requests=per_min(1, 10))
    p0 = plan(pool, "checkout", "P0", share=1.0, pool_requests=per_min(1, 10))
    flood = await admit_many(store, batch, 20)
    assert sum(d.admitted for d in flood) == 4
    assert flood[-1].refused_by == "class.requests_per_minute"
    assert sum(d.admitted for d in await admit_many(store, p0, 10)) == 6


async def test_lower_class_uses_idle_capacity(stores: StoreFactory) -> None:
    store = await stores()
    pool = new_pool()
    p1 = plan(pool, "recs", "P1", share=0.85, pool_concurrency=20)
    assert sum(d.admitted for d in await admit_many(store, p1, 20)) == 17


async def test_headers_name_the_tightest_limit(stores: StoreFactory) -> None:
    store = await stores()
    p = plan(
        new_pool(),
        pool_requests=per_min(600, 100),
        workload_requests=per_min(60, 10),
        workload_tokens=per_min(6000, 1000),
    )
    d = await store.admit(p, 100)
    assert d.admitted and d.binding == "workload.requests_per_minute"
    assert d.limit == pytest.approx(60) and d.remaining == pytest.approx(9, abs=0.01)
    assert d.remaining_requests == 9 and d.remaining_tokens == 900
    assert 990 <= d.reset_ms <= 1001  # one request at 1/s away from full


# --- the two implementations agree ----------------------------------------------------


async def _run_sequence(store: Store, pool: str, seed: int) -> list[tuple[Any, ...]]:
    """Random admits/settles with (practically) no refill: decisions must be deterministic."""
    rng = random.Random(seed)
    slow = 1e-9

    def mk(wl: str, pri: str, share: float) -> AdmitPlan:
        return plan(
            pool,
            wl,
            pri,
            share,
            pool_requests=per_min(slow, 40),
            pool_tokens=per_min(slow, 20_000),
            pool_concurrency=12,
            workload_requests=per_min(slow, 25),
            workload_tokens=per_min(slow, 12_000),
            workload_concurrency=7,
        )

    plans = [mk("a", "P0", 1.0), mk("b", "P2", 0.6), mk("c", "batch", 0.4)]
    held: list[tuple[AdmitPlan, str, int]] = []
    out: list[tuple[Any, ...]] = []
    for _ in range(120):
        if held and rng.random() < 0.35:
            p, lease, reserved = held.pop(rng.randrange(len(held)))
            store.settle(p, lease, reserved, rng.randint(0, reserved * 2))
            await store.flush()
            continue
        p = rng.choice(plans)
        tokens = rng.choice([0, 50, 400, 1500, 5000, 15_000])
        d = await store.admit(p, tokens)
        out.append((d.admitted, d.refused_by, d.binding, d.remaining_requests, d.remaining_tokens))
        if d.admitted:
            assert d.lease is not None
            held.append((p, d.lease, tokens))
    return out


async def test_lua_and_python_decide_identically(stores: StoreFactory, backend: Backend) -> None:
    if not backend.shared:
        pytest.skip("compares Redis against the embedded store")
    store = await stores()
    embedded = EmbeddedStore()
    await embedded.start()
    try:
        for seed in range(3):
            expected = await _run_sequence(embedded, new_pool(), seed)
            assert await _run_sequence(store, new_pool(), seed) == expected
            assert any(not e[0] for e in expected) and any(e[0] for e in expected)
    finally:
        await embedded.close()
