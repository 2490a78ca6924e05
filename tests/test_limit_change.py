"""A rate or burst changed by a reload applies at once, on every backend (model.rebase).

A bucket's TAT is what was used of it, measured in time at the rate it was written under.
Read as it is under a higher rate or a lower burst it was deeper than empty: a raise from
1/min to 600/min still refused for ~55 s, and a pool once at 1e-300/min stayed refused for
good. Each TAT is now stored with its limit and read under the one in force: what was used
is kept in requests or tokens, and is at most one whole burst of the new limit.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.admission import Bucket, Store
from proxy.admission.gate import rate_limit_headers
from proxy.app import POLICY_REF, STORE, Settings, build_app
from proxy.config import Policy
from proxy.ops.reload import RELOADER, Loaded
from proxy.policy import CompiledPolicy
from tests.support.admission_helpers import Backend, new_pool, per_min, plan

#: Per minute: nothing refills while a test runs.
TINY = 1e-9


def _reset_s(bucket: Bucket) -> int:
    """The most a ``RateLimit`` header's ``t`` may say under ``bucket``: a refill from empty."""
    return math.ceil(bucket.burst / bucket.rate_per_s)


@pytest.mark.parametrize("old_rpm", [1.0, TINY, 1e-300])
async def test_a_raised_rate_admits_at_once_what_the_old_limit_left_room_for(
    store: Store, old_rpm: float
) -> None:
    pool = new_pool()
    old = plan(pool, pool_requests=per_min(old_rpm, 1))
    assert [(await store.admit(old, 0)).admitted for _ in range(2)] == [True, False]
    new = plan(pool, pool_requests=per_min(600, 100))
    d = await store.admit(new, 0)
    # One request was used of the old limit: 99 of the new one's 100 are left.
    assert d.admitted, (d.refused_by, d.retry_after_ms)
    assert d.remaining_requests == 98


async def test_after_a_raise_from_a_tiny_rate_a_call_waits_one_new_interval_at_most(
    store: Store,
) -> None:
    pool = new_pool()
    old = plan(pool, pool_requests=per_min(TINY, 3), workload_tokens=per_min(TINY, 5000))
    assert [(await store.admit(old, 1000)).admitted for _ in range(4)] == [True] * 3 + [False]
    # More was used than the new bursts hold: both buckets read empty, and refill at 10/s
    # and 1000 tokens/s, not at 1e-9/min.
    rpm, tpm = per_min(600, 2), per_min(60_000, 1000)
    new = plan(pool, pool_requests=rpm, workload_tokens=tpm)
    d = await store.admit(new, 100)
    assert not d.admitted and d.retry_after_ms <= 101, (d.refused_by, d.retry_after_ms)
    t = int(rate_limit_headers(d)["RateLimit"].rpartition(";t=")[2])
    assert t <= max(_reset_s(rpm), _reset_s(tpm))
    await asyncio.sleep(d.retry_after_ms / 1000 + 0.02)
    assert (await store.admit(new, 100)).admitted


@pytest.mark.parametrize(
    ("old", "used"),
    [(per_min(6000, 100), 50), (per_min(60, 100), 100)],
    ids=["lower-rate-and-burst", "lower-burst"],
)
async def test_a_lowered_limit_applies_from_the_next_admission_with_one_burst_owed_at_most(
    store: Store, old: Bucket, used: int
) -> None:
    pool = new_pool()
    assert all(
        [(await store.admit(plan(pool, pool_requests=old), 0)).admitted for _ in range(used)]
    )
    lowered = per_min(60, 10)  # one a second
    new = plan(pool, pool_requests=lowered)
    d = await store.admit(new, 0)
    # More than 10 were used: empty, one request back within a second (not `used` seconds).
    assert not d.admitted and d.refused_by == "pool.requests_per_minute"
    assert d.retry_after_ms <= 1001 and d.reset_ms <= 10_000
    await asyncio.sleep(d.retry_after_ms / 1000 + 0.02)
    assert (await store.admit(new, 0)).admitted


async def test_a_call_admitted_before_a_raise_settles_under_its_own_limit(store: Store) -> None:
    pool = new_pool()
    old = plan(pool, workload_tokens=per_min(TINY, 1000))
    d = await store.admit(old, 1000)
    assert d.admitted and d.lease is not None
    new = plan(pool, workload_tokens=per_min(60_000, 1000))
    # Reserved 1000 under the old limit, used 100: 900 of the new burst are left.
    store.settle(old, d.lease, 1000, 100)
    await store.flush()
    after = await store.admit(new, 850)
    assert after.admitted, (after.refused_by, after.retry_after_ms)


async def test_an_unchanged_limit_keeps_the_debt_of_usage_settled_above_its_reservation(
    store: Store,
) -> None:
    pool = new_pool()
    tpm = per_min(600, 1000)  # 10 tokens/s
    p = plan(pool, workload_tokens=tpm)
    d = await store.admit(p, 500)
    assert d.lease is not None
    store.settle(p, d.lease, 500, 1600)  # 600 tokens below empty
    await store.flush()
    refused = await store.admit(plan(pool, workload_tokens=tpm), 1)
    assert not refused.admitted and refused.retry_after_ms >= 60_000
    # The headers speak of the limit in force: a refill from empty at most.
    t = int(rate_limit_headers(refused)["RateLimit"].rpartition(";t=")[2])
    assert t <= _reset_s(tpm) == 100


async def test_a_bucket_written_before_limits_were_stored_reads_at_most_empty(
    backend: Backend, store: Store
) -> None:
    if backend.url is None:
        pytest.skip("a value of an older version exists in Redis only")
    pool = new_pool()
    rpm = per_min(600, 5)
    p = plan(pool, pool_requests=rpm)
    client = backend.client()
    try:
        # An old version's <dd> (rpm TAT, tpm TAT), left centuries in debt by a rate of 1e-300.
        far = time.time() * 1000 + 1e15
        client.hset(p.keys.pool, "p", struct.pack("<dd", far, 0.0))
        d = await store.admit(p, 0)
        assert not d.admitted and d.retry_after_ms <= 101, d.retry_after_ms
        await asyncio.sleep(d.retry_after_ms / 1000 + 0.02)
        assert (await store.admit(p, 0)).admitted
    finally:
        client.close()


def _policy(pool: str, rpm: float) -> dict[str, Any]:
    return {
        "identity": {"header_mode": True},
        "models": {pool: {"ids": ["anthropic.claude-3-haiku-20240307-v1:0"]}},
        "workloads": {"chat": {"limits": {pool: {"requests_per_minute": rpm}}}},
        "server": {"access_log": False},
    }


@pytest.mark.timeout(90)
async def test_a_reload_from_one_to_600_per_minute_admits_within_a_tenth_of_a_second(
    backend: Backend,
) -> None:
    pool = f"haiku{uuid.uuid4().hex[:8]}"
    app = build_app(
        Policy.model_validate(_policy(pool, 1)),
        Settings(upstream="simulator", redis_url=backend.url),
    )
    server = TestServer(app)
    await server.start_server()
    try:
        store: Any = app[STORE]

        async def admit() -> Any:
            compiled = app[POLICY_REF].current
            info = compiled.workloads["chat"]
            return await store.admit(compiled.plan(info, compiled.pools[pool], info.priority), 0)

        assert [(await admit()).admitted for _ in range(2)] == [True, False]
        new = CompiledPolicy(Policy.model_validate(_policy(pool, 600)))
        await app[RELOADER].install(new, Loaded(2, "sha", "test", time.time(), "test"))
        d = await admit()
        if not d.admitted:  # at worst empty: one request back within 0.1 s
            assert d.retry_after_ms <= 101, (d.refused_by, d.retry_after_ms)
            await asyncio.sleep(d.retry_after_ms / 1000 + 0.02)
            d = await admit()
        assert d.admitted, (d.refused_by, d.retry_after_ms)
        t = int(rate_limit_headers(d)["RateLimit"].rpartition(";t=")[2])
        assert t <= 10  # the new limit's default burst: 10 s of refill
    finally:
        await server.close()
