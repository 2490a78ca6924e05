"""The circuit breaker per model pool: the state machine, and one state for the whole fleet."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.backend.store import EmbeddedStore, RedisStore
from proxy.config import Breaker, parse_policy
from proxy.control.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    STALL_MIN_S,
    BreakerBoard,
    BreakerRecord,
    next_state,
    next_state_cut,
)
from proxy.control.controller import Adaptivity
from proxy.policy import CompiledPolicy
from tests.support.admission_helpers import Backend, new_pool, until

CFG = Breaker(
    threshold=0.1, window_seconds=30, min_requests=20, open_seconds=10, half_open_probes=3
)


def test_opens_at_the_threshold_with_enough_volume() -> None:
    closed = BreakerRecord()
    assert next_state(closed, 100, 9, CFG, 0) is None
    assert next_state(closed, 100, 10, CFG, 0) == (OPEN, "10/100 failed (threshold 0.1)")
    assert next_state(closed, 19, 19, CFG, 0) is None  # too few requests to judge


def test_open_waits_then_half_opens() -> None:
    opened = BreakerRecord(OPEN, 1, since_ms=1_000)
    assert next_state(opened, 0, 0, CFG, 10_999) is None
    assert next_state(opened, 0, 0, CFG, 11_000) == (HALF_OPEN, "open for 10 s")


def test_half_open_closes_on_probe_success_and_reopens_on_failure() -> None:
    half = BreakerRecord(HALF_OPEN, 2, since_ms=0, probes=3, ok=2)
    assert next_state(half, 0, 0, CFG, 1_000) is None
    assert next_state(BreakerRecord(HALF_OPEN, 2, 0, 3, ok=3), 0, 0, CFG, 1_000) == (
        CLOSED,
        "3 probe(s) succeeded",
    )
    assert next_state(BreakerRecord(HALF_OPEN, 2, 0, 3, ok=2, fail=1), 0, 0, CFG, 1_000) == (
        OPEN,
        "1 probe(s) failed",
    )
    quiet = BreakerRecord(HALF_OPEN, 2, since_ms=0, probes=1, ok=1)
    assert next_state(quiet, 0, 0, CFG, 9_999) is None
    assert next_state(quiet, 0, 0, CFG, 10_000) == (
        CLOSED,
        "1 probe(s) succeeded, no demand for more",
    )
    stalled = BreakerRecord(HALF_OPEN, 2, since_ms=0, probes=3)
    assert next_state(stalled, 0, 0, CFG, int(STALL_MIN_S * 1000)) == (
        OPEN,
        "probes did not report back",
    )


def test_board_spends_only_claimed_probe_tokens() -> None:
    board = BreakerBoard()
    assert board.allow("p")  # never seen: closed
    board.update("p", BreakerRecord(OPEN, 1, 0), granted=False)
    assert not board.allow("p")
    board.update("p", BreakerRecord(HALF_OPEN, 2, 0), granted=False)
    assert not board.allow("p")  # no token yet, but demand is noted...
    assert board.probe_request("p") == (1, 2, 0, 0)  # ...so the next tick claims one
    board.update("p", BreakerRecord(HALF_OPEN, 2, 0, probes=1), granted=True)
    assert board.allow("p") and not board.allow("p")
    board.outcome("p", failed=False)
    board.outcome("p", failed=True)  # no probe outstanding: not attributed
    assert board.probe_request("p") == (1, 2, 1, 0)
    board.fresh = False
    board.update("p", BreakerRecord(OPEN, 3, 0), granted=False)
    assert board.allow("p")  # a stale view fails open


# --- the fleet -----------------------------------------------------------------------------


def _policy(pool: str) -> CompiledPolicy:
    breaker = {"threshold": 0.1, "window_seconds": 1, "min_requests": 20, "open_seconds": 0.3}
    return CompiledPolicy(
        parse_policy(
            {
                "models": {pool: {"ids": [f"anthropic.{pool}"], "breaker": breaker}},
                "priorities": {"P0": {}},
                "workloads": {"chat": {"priority": "P0"}},
            }
        ),
        env={},
    )


Fleet = tuple[str, list[Adaptivity], list[CollectorRegistry]]


@pytest.fixture
async def fleet(backend: Backend) -> AsyncIterator[Fleet]:
    pool = new_pool()
    n = 3 if backend.shared else 1  # embedded mode is one instance by definition
    registries = [CollectorRegistry() for _ in range(n)]
    instances = [
        Adaptivity(
            _policy(pool),
            EmbeddedStore(),
            backend.url,
            registry=registries[i],
            tick_s=0.05,
            bucket_s=0.05,
            timeout_s=2.0,
            instance_id=f"proxy-{i}",
        )
        for i in range(n)
    ]
    for a in instances:
        await a.start()
    yield pool, instances, registries
    for a in instances:
        await a.close()


def state(registry: CollectorRegistry, pool: str) -> Any:
    return registry.get_sample_value("sluice_breaker_state", {"pool": pool})


async def _probe_round(instances: list[Adaptivity], pool: str, seconds: float) -> list[int]:
    """Every instance keeps asking for ``seconds``; returns the calls each one let through."""
    granted = [0] * len(instances)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for i, a in enumerate(instances):
            granted[i] += a.breaker_allows(pool)
        await asyncio.sleep(0.005)
    return granted


async def _trip(a: Adaptivity, pool: str) -> None:
    for i in range(100):
        a.observe(pool, "P0", 300.0, i % 10 == 0, False)  # exactly 10% throttled


async def test_breaker_opens_for_the_fleet_and_probes_are_shared(
    fleet: Fleet, record_property: Any
) -> None:
    pool, instances, registries = fleet
    first = instances[0]
    for i in range(100):
        first.observe(pool, "P0", 300.0, i % 12 == 0, False)  # 9%: stays closed
    await asyncio.sleep(0.3)
    assert all(a.breaker_allows(pool) for a in instances)

    await _trip(first, pool)
    opened = time.monotonic()
    # The instance that saw the throttles and every other instance agree within a tick.
    await until(lambda: all(state(r, pool) == OPEN for r in registries))
    assert not any(a.breaker_allows(pool) for a in instances)
    transitions = sum(
        r.get_sample_value("sluice_breaker_transitions_total", {"pool": pool, "to": "open"}) or 0
        for r in registries
    )
    assert transitions == 1  # written once, by whichever instance saw it first

    # Half-open after open_seconds: exactly half_open_probes calls get through fleet-wide.
    granted = await _probe_round(instances, pool, 1.0)
    assert time.monotonic() - opened >= 0.3
    assert sum(granted) == 3, granted
    assert all(state(r, pool) == HALF_OPEN for r in registries)

    # The probes succeed: closed everywhere.
    for a, n in zip(instances, granted, strict=True):
        for _ in range(n):
            a.observe(pool, "P0", 300.0, False, False)
    await until(lambda: all(state(r, pool) == CLOSED for r in registries))
    assert all(a.breaker_allows(pool) for a in instances)
    # The throttles that opened it are still inside the window but no longer count.
    await asyncio.sleep(0.2)
    assert all(state(r, pool) == CLOSED for r in registries)
    print(f"probes granted per instance: {granted}")
    record_property("probes_granted", granted)


async def test_failed_probe_opens_the_breaker_again(fleet: Fleet) -> None:
    pool, instances, registries = fleet
    await _trip(instances[-1], pool)
    await until(lambda: all(state(r, pool) == OPEN for r in registries))
    await until(lambda: all(state(r, pool) == HALF_OPEN for r in registries))
    probe_at: list[Adaptivity] = []

    def one_probe() -> bool:
        probe_at.extend(a for a in instances if a.breaker_allows(pool))
        return bool(probe_at)

    await until(one_probe)
    probe_at[0].observe(pool, "P0", 30_000.0, False, True)  # the probe fails with a 5xx
    await until(lambda: all(state(r, pool) == OPEN for r in registries))
    reopened = sum(
        r.get_sample_value("sluice_breaker_transitions_total", {"pool": pool, "to": "open"}) or 0
        for r in registries
    )
    assert reopened == 2
    assert not any(a.breaker_allows(pool) for a in instances)


# --- a breaker that cuts the adaptive limit instead of refusing -----------------------------


def test_cut_breaker_needs_volume_in_every_state() -> None:
    """3 failures of 15 move nothing: min_requests is the evidence every state needs."""
    closed, opened = BreakerRecord(), BreakerRecord(OPEN, 1, since_ms=0)
    half = BreakerRecord(HALF_OPEN, 2, since_ms=0)
    for rec in (closed, opened, half):
        assert next_state_cut(rec, 15, 3, CFG, 60_000) is None
    assert next_state_cut(closed, 30, 3, CFG, 0) == (OPEN, "3/30 failed (threshold 0.1)")


def test_cut_breaker_stays_open_while_failing_and_for_open_seconds() -> None:
    opened = BreakerRecord(OPEN, 1, since_ms=1_000)
    assert next_state_cut(opened, 100, 0, CFG, 10_999) is None  # minimum open time
    assert next_state_cut(opened, 100, 20, CFG, 60_000) is None  # still failing at the cut
    assert next_state_cut(opened, 100, 5, CFG, 11_000) == (
        HALF_OPEN,
        "5/100 failed at the cut limit after 10.0 s open",
    )


def test_cut_breaker_closes_only_after_sustained_success() -> None:
    half = BreakerRecord(HALF_OPEN, 2, since_ms=0)
    assert next_state_cut(half, 100, 0, CFG, 9_999) is None  # not yet sustained
    assert next_state_cut(half, 100, 6, CFG, 20_000) is None  # 6%: not failing, not healthy
    assert next_state_cut(half, 100, 4, CFG, 20_000) == (
        CLOSED,
        "4/100 failed: sustained success for 20.0 s",
    )
    assert next_state_cut(half, 40, 4, CFG, 1_000) == (OPEN, "4/40 failed while half-open")


def _cut_policy(pool: str) -> CompiledPolicy:
    breaker = {"threshold": 0.1, "window_seconds": 1, "min_requests": 20, "open_seconds": 0.3}
    adaptive = {"ceiling": 40, "initial": 40, "interval_seconds": 0.2, "decrease": 0.5}
    model = {"ids": [f"anthropic.{pool}"], "concurrency": 40, "breaker": breaker}
    return CompiledPolicy(
        parse_policy(
            {
                "models": {pool: {**model, "adaptive": adaptive}},
                "priorities": {"P0": {}},
                "workloads": {"chat": {"priority": "P0"}},
            }
        ),
        env={},
    )


def _healthy(a: Adaptivity, pool: str) -> bool:
    """Four healthy P0 calls of 100 ms (an ``until`` condition that also feeds the pool)."""
    for _ in range(4):
        a.observe(pool, "P0", 100.0, False, False)
    return True


async def test_open_breaker_cuts_the_limit_and_refuses_nobody(backend: Backend) -> None:
    """Open means "stop hammering Bedrock": the limit is cut, P0 still gets through."""
    pool, registry = new_pool(), CollectorRegistry()
    store: Any = RedisStore(backend.url) if backend.url else EmbeddedStore()
    await store.start()
    a = Adaptivity(
        _cut_policy(pool), store, backend.url, registry=registry, tick_s=0.05, bucket_s=0.05
    )
    await a.start()
    try:
        await until(lambda: a.limit(pool) == 40)
        await asyncio.sleep(0.3)  # an interval after the last change: the breaker's to cut
        await _trip(a, pool)
        await until(lambda: state(registry, pool) == OPEN)
        assert a.breaker_allows(pool)  # nobody is refused by the breaker itself
        # Cut at once, not an interval later: 40 x 0.5 (no quota learned from these calls).
        await until(lambda: (a.limit(pool) or 40) <= 20)
        cut_to = a.limit(pool)
        assert not a.retry_headroom(pool)  # and no retries while it is open
        await asyncio.sleep(0.5)
        assert state(registry, pool) == OPEN  # no evidence since opening: no move
        # Healthy at the cut limit, as a pool that keeps serving is: evidence keeps coming
        # (a single batch can fall in the bucket of the transition, which no state counts).
        await until(lambda: _healthy(a, pool) and state(registry, pool) == HALF_OPEN)
        await until(lambda: _healthy(a, pool) and state(registry, pool) == CLOSED)
        # No demand: the limit holds under the cut (the throttled interval may take one more).
        assert (a.limit(pool) or 0) <= (cut_to or 0) <= 20
    finally:
        await a.close()
        await store.close()
