"""Fleet observations: counts and p99 merged across instances, on Redis, Cluster and in-process.

Several :class:`FleetStats` / :class:`Adaptivity` objects with their own connections in
one test process stand in for several Sluice instances.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from proxy.backend.store import EmbeddedStore, RedisStore
from proxy.control.controller import Adaptivity
from proxy.control.fleet import (
    N_BUCKETS,
    FleetStats,
    PoolControl,
    Window,
    bucket_index,
    quantile_ms,
)
from proxy.control.window import BUCKET_BOUNDS_MS
from proxy.policy import CompiledPolicy
from tests.support.admission_helpers import Backend, new_pool, plan, shedding_policy
from tests.support.redis_fixtures import RedisServerProcess

FleetFactory = Callable[..., Any]


@pytest.fixture
async def fleets(backend: Backend) -> AsyncIterator[FleetFactory]:
    """``await make()`` → a started FleetStats (embedded: all share one in-process store)."""
    made: list[FleetStats] = []
    shared = EmbeddedStore()

    async def make(window_s: float = 2.0, bucket_s: float = 0.1) -> FleetStats:
        fleet = FleetStats(
            backend.url,
            shared,
            instance_id=f"i{len(made)}",
            longest_window_s=window_s,
            bucket_s=bucket_s,
            timeout_s=2.0,
        )
        await fleet.start()
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        await fleet.close()


def test_bucket_index_is_monotonic_and_bounded() -> None:
    values = [0.0, 0.5, 1.0, 1.01, 1.25, 1.26, 600.0, 1200.0, 10_000.0, 1e9]
    idx = [bucket_index(v) for v in values]
    assert idx == sorted(idx)
    assert idx[0] == idx[2] == 0 and idx[3] == idx[4] == 1 and idx[5] == 2
    assert idx[-1] == N_BUCKETS - 1


def test_bisecting_the_bucket_bounds_gives_bucket_index_even_at_the_edges() -> None:
    # The dashboard tap buckets with bisect_left over BUCKET_BOUNDS_MS instead of a call.
    edges = [v for b in BUCKET_BOUNDS_MS for v in (b, math.nextafter(b, 0), math.nextafter(b, 1e9))]
    rng = random.Random(7)
    values = [0.0, 0.5, 1.0, 1e12, *edges, *(10 ** rng.uniform(-3, 7) for _ in range(20_000))]
    assert [bisect_left(BUCKET_BOUNDS_MS, v) for v in values] == [bucket_index(v) for v in values]


def test_p99_of_a_histogram_is_within_a_bucket_of_the_exact_value() -> None:
    rng = random.Random(7)
    latencies = [rng.lognormvariate(6.5, 0.6) for _ in range(20_000)]
    hist = [0] * N_BUCKETS
    for ms in latencies:
        hist[bucket_index(ms)] += 1
    exact = sorted(latencies)[int(0.99 * len(latencies)) - 1]
    estimate = quantile_ms(hist, 0.99)
    assert estimate is not None
    assert abs(estimate / exact - 1) < 0.25  # one bucket is a factor of 1.25
    assert quantile_ms([0] * N_BUCKETS, 0.99) is None


def test_windows_merge_by_adding_histograms() -> None:
    a = Window(10, 1, 0, tuple(10 if j == 20 else 0 for j in range(N_BUCKETS)))
    b = Window(90, 0, 2, tuple(90 if j == 10 else 0 for j in range(N_BUCKETS)))
    merged = a + b
    assert (merged.requests, merged.throttles, merged.errors, merged.failures) == (100, 1, 2, 3)
    # 10% of the calls are slow, so the merged p99 lies in the slow bucket.
    assert merged.p99_ms is not None and 1.25**19 <= merged.p99_ms <= 1.25**20


async def test_three_instances_see_one_merged_view(fleets: FleetFactory, backend: Backend) -> None:
    if not backend.shared:
        pytest.skip("embedded mode is one instance by definition")
    pool = new_pool()
    a, b, c = [await fleets() for _ in range(3)]
    for _ in range(50):
        a.observe(pool, "P0", 200.0, False, False)
        b.observe(pool, "P0", 400.0, True, False)
    for _ in range(10):
        c.observe(pool, "batch", 3000.0, False, True)
    for fleet in (a, b, c):
        await fleet.exchange({pool: PoolControl()})
    view = (await a.exchange({pool: PoolControl()}))[pool].window(2.0)
    assert view.total.requests == 110
    assert view.total.throttles == 50 and view.total.errors == 10
    assert view.by_class["P0"].requests == 100 and view.by_class["batch"].requests == 10
    p0 = view.by_class["P0"].p99_ms
    assert p0 is not None and 400 / 1.25 <= p0 <= 400 * 1.25  # within one bucket
    assert view.total.p99_ms is not None and view.total.p99_ms > 2400


async def test_counts_leave_the_window_when_it_passes(fleets: FleetFactory) -> None:
    pool = new_pool()
    fleet = await fleets(window_s=0.5, bucket_s=0.1)
    for _ in range(20):
        fleet.observe(pool, "P0", 100.0, False, False)
    first = (await fleet.exchange({pool: PoolControl()}))[pool]
    assert first.window(0.5).total.requests == 20
    await asyncio.sleep(0.7)
    later = (await fleet.exchange({pool: PoolControl()}))[pool]
    assert later.window(0.5).total.requests == 0


async def test_a_window_can_start_after_a_moment(fleets: FleetFactory) -> None:
    pool = new_pool()
    fleet = await fleets(window_s=2.0, bucket_s=0.1)
    fleet.observe(pool, "P0", 100.0, True, False)
    first = (await fleet.exchange({pool: PoolControl()}))[pool]
    await asyncio.sleep(0.25)
    fleet.observe(pool, "P0", 100.0, False, False)
    later = (await fleet.exchange({pool: PoolControl()}))[pool]
    assert later.window(2.0).total.requests == 2
    since = later.window(2.0, since_ms=first.now_ms)
    assert (since.total.requests, since.total.throttles) == (1, 0)


async def test_peak_in_flight_comes_from_the_pools_leases(backend: Backend) -> None:
    pool = new_pool()
    store = RedisStore(backend.url) if backend.url else EmbeddedStore()
    await store.start()
    fleet = FleetStats(
        backend.url, store, instance_id="x", longest_window_s=1.0, bucket_s=0.1, timeout_s=2.0
    )
    try:
        p = plan(pool, pool_concurrency=10)
        decisions = [await store.admit(p, 0) for _ in range(7)]
        tick = (await fleet.exchange({pool: PoolControl()}))[pool]
        assert tick.in_flight == 7
        assert tick.window(1.0).peak_in_flight == 7
        for d in decisions:
            assert d.lease is not None
            store.settle(p, d.lease, 0, 0)
        await store.flush()
        tick = (await fleet.exchange({pool: PoolControl()}))[pool]
        assert tick.in_flight == 0 and tick.window(1.0).peak_in_flight == 7
    finally:
        await fleet.close()
        await store.close()


async def test_exchange_survives_a_script_flush(redis_server: RedisServerProcess) -> None:
    pool = new_pool()
    fleet = FleetStats(
        redis_server.url, EmbeddedStore(), instance_id="x", longest_window_s=1.0, bucket_s=0.1
    )
    await fleet.start()
    try:
        fleet.observe(pool, "P0", 10.0, False, False)
        redis_server.cli("script", "flush")
        tick = (await fleet.exchange({pool: PoolControl()}))[pool]
        assert tick.window(1.0).total.requests == 1  # sent once after the reload, not twice
    finally:
        await fleet.close()


def _policy(pool: str) -> CompiledPolicy:
    return shedding_policy(
        pool,
        {"ceiling": 40, "interval_seconds": 0.2},
        {"window_seconds": 1, "min_requests": 5},
        priorities={"P0": {"target_p99_ms": 1000}, "batch": {}},
        workloads={
            "chat": {"priority": "P0"},
            "enrich": {"priority": "batch", "pause": {"when_class": "P0"}},
        },
    )


async def test_redis_down_never_reaches_the_request_path(
    redis_factory: Callable[..., RedisServerProcess], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_factory()
    pool = new_pool()
    registry = CollectorRegistry()
    store = RedisStore(server.url, timeout_s=0.1)
    await store.start()
    a = Adaptivity(
        _policy(pool), store, server.url, registry=registry, tick_s=0.05, timeout_s=0.1,
        stale_after_s=0.2,
    )  # fmt: skip
    await a.start()
    try:
        a.observe(pool, "P0", 100.0, False, False)
        await a.tick()
        assert a.limit(pool) == 40
        server.kill()
        started = time.perf_counter()
        with caplog.at_level(logging.WARNING, logger="sluice.adaptive"):
            for _ in range(10_000):
                a.observe(pool, "P0", 100.0, True, True)
                assert a.breaker_allows(pool)
                assert not a.paused("enrich")
            per_call_us = (time.perf_counter() - started) / 10_000 * 1e6
            t0 = time.perf_counter()
            await a.tick()
            assert time.perf_counter() - t0 < 1.0  # bounded by the timeout (+ reconnect)
            await asyncio.sleep(0.3)
        errors = registry.get_sample_value("sluice_fleet_errors_total", {"operation": "tick"})
        assert errors is not None and errors >= 2
        events = [getattr(r, "fields", {}).get("event") for r in caplog.records]
        assert "fleet_unavailable" in events and "fleet_stale" in events
        assert a.limit(pool) == 40  # last known value, not cleared
        print(f"observe+breaker_allows+paused with Redis down: {per_call_us:.2f} us/call")
        server.restart()
        await a.tick()  # reconnects and reloads the scripts on an empty server
        assert a.breakers.fresh
    finally:
        await a.close()
        await store.close()


async def test_redis_down_at_start_is_not_fatal(redis_factory: Callable[..., Any]) -> None:
    server = redis_factory()
    url = server.url
    server.kill()
    pool = new_pool()
    registry = CollectorRegistry()
    a = Adaptivity(
        _policy(pool), EmbeddedStore(), url, registry=registry, tick_s=0.05, timeout_s=0.1
    )
    await a.start()
    a.observe(pool, "P0", 1.0, False, False)
    await asyncio.sleep(0.2)
    await a.close()
    errors = registry.get_sample_value("sluice_fleet_errors_total", {"operation": "tick"})
    assert errors is not None and errors >= 2


async def test_embedded_mode_runs_the_same_loop() -> None:
    pool = new_pool()
    store = EmbeddedStore()
    registry = CollectorRegistry()
    a = Adaptivity(_policy(pool), store, None, registry=registry, tick_s=0.05)
    for _ in range(20):
        a.observe(pool, "P0", 100.0, False, False)
    await a.tick()
    assert a.limit(pool) == 40
    assert (await store.pool_stats(pool))["dynamic_limit"] == 40
    assert registry.get_sample_value("sluice_adaptive_limit", {"pool": pool}) == 40
    assert registry.get_sample_value("sluice_fleet_errors_total", {"operation": "tick"}) is None


async def test_every_key_of_a_pool_carries_its_hash_tag(redis_server: RedisServerProcess) -> None:
    pool = new_pool()
    fleet = FleetStats(
        redis_server.url, EmbeddedStore(), instance_id="x", longest_window_s=1.0, bucket_s=0.1
    )
    await fleet.start()
    fleet.observe(pool, "P0", 1.0, False, False)
    await fleet.exchange({pool: PoolControl(leader_px=1000)})
    await fleet.close()
    client = redis.Redis.from_url(redis_server.url)
    keys = client.keys(f"*{pool}*")
    client.close()
    assert keys and all(k.decode().startswith(f"sluice:{{{pool}}}:") for k in keys)
