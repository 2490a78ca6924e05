"""A requeued throttled call waits for the fleet's answer to *its* throttle -- a cut after
its send -- not for any limit change from now (issue 9, found by ``bench/sweep.py
--vary-policy`` seed 18).

With a 3 s control interval and P0 waiting at most 500 ms, P0 calls throttled right after
a quota cut waited for a change from the limit as it was when they were requeued. The
reflex had already cut it while they were out at Bedrock, so they sat out their whole wait
for a second change and were refused (P0 98.8% where its demand fits).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.backend.store import RedisStore
from proxy.config import parse_policy
from proxy.control.controller import Adaptivity
from proxy.errors import BedrockError
from proxy.metrics import Metrics
from proxy.pipeline.call import Call
from proxy.pipeline.identify import Caller
from proxy.pipeline.requeue import requeue
from proxy.policy import CompiledPolicy, PoolInfo

INTERVAL_S = 3.0
MAX_WAIT_S = 2.0


def _policy(pool: str) -> CompiledPolicy:
    adaptive = {"floor": 1, "ceiling": 20, "initial": 10, "interval_seconds": INTERVAL_S}
    model = {"ids": [f"anthropic.{pool}"], "concurrency": 20, "adaptive": adaptive}
    wait = {"priority": "P0", "max_wait_ms": round(MAX_WAIT_S * 1000)}
    return CompiledPolicy(
        parse_policy(
            {
                "server": {"adaptivity": {"tick_seconds": 0.1}},
                "models": {pool: model},
                "priorities": {"P0": {}},
                "workloads": {"orders": wait},
            }
        ),
        env={},
    )


Setup = tuple[str, CompiledPolicy, Adaptivity]


@pytest.fixture
async def setup(redis_server: Any) -> AsyncIterator[Setup]:
    pool = f"p{uuid.uuid4().hex[:8]}"
    policy = _policy(pool)
    store = RedisStore(redis_server.url)
    await store.start()
    a = Adaptivity(
        policy, store, redis_server.url, registry=CollectorRegistry(), tick_s=0.1, bucket_s=0.1
    )
    await a.start()
    try:
        for _ in range(100):
            if a.limit(pool) == 10:
                break
            await asyncio.sleep(0.05)
        assert a.limit(pool) == 10
        yield pool, policy, a
    finally:
        await a.close()
        await store.close()


async def _readmitted_after(policy: CompiledPolicy, pool: str, a: Adaptivity, sent: float) -> float:
    """Seconds from requeueing (no backoff) until the call queues for a new slot."""
    info = policy.workloads["orders"]
    call = Call("r1", time.perf_counter(), policy, pool=PoolInfo(pool, 1.0, 256))
    call.caller = Caller(info, info.priority, "header")
    queued: list[float] = []

    async def readmit(_: Call, backoff: Awaitable[None], until: float) -> BedrockError | None:
        await backoff
        queued.append(time.perf_counter())
        return None  # granted at once: what is measured is the wait before asking

    metrics = Metrics()
    start = time.perf_counter()
    await requeue(call, 0.0, start + 30.0, a, readmit, metrics, sent)
    return queued[0] - start


async def test_a_cut_while_the_attempt_was_out_is_its_answer(setup: Setup) -> None:
    pool, policy, a = setup
    sent = time.perf_counter()  # the attempt goes out; the fleet cuts while it is out
    assert await a.limits.set(pool, 10, 6, "test: a cut while the attempt was out")
    # The old wait (for a change from 6, as read at the requeue) sat out MAX_WAIT_S here.
    assert await _readmitted_after(policy, pool, a, sent) < 0.2


async def test_a_call_sent_after_the_last_cut_waits_for_the_next(setup: Setup) -> None:
    pool, policy, a = setup
    assert await a.limits.set(pool, 10, 6, "test: an earlier cut")
    await asyncio.sleep(0.05)
    sent = time.perf_counter()

    async def cut_later() -> None:
        await asyncio.sleep(0.4)
        await a.limits.set(pool, 6, 5, "test: the cut that answers")

    cutting = asyncio.create_task(cut_later())
    took = await _readmitted_after(policy, pool, a, sent)
    await cutting
    assert 0.35 < took < MAX_WAIT_S - 0.3, took


async def test_a_raise_is_no_answer_to_a_throttle(setup: Setup) -> None:
    pool, policy, a = setup
    sent = time.perf_counter()
    assert await a.limits.set(pool, 10, 12, "test: a raise while the attempt was out")
    took = await _readmitted_after(policy, pool, a, sent)
    # No cut comes: it waits out its own max_wait_ms (under the 3.1 s interval and tick).
    assert MAX_WAIT_S - 0.1 < took < MAX_WAIT_S + 0.5, took


async def test_a_cut_learned_through_a_write_that_lost_is_an_answer(
    setup: Setup, redis_server: Any
) -> None:
    """Another instance's cut that this one learns only when its own write loses to it."""
    pool, policy, a = setup
    store = RedisStore(redis_server.url)
    await store.start()
    other = Adaptivity(
        policy, store, redis_server.url, registry=CollectorRegistry(), tick_s=0.1, bucket_s=0.1
    )
    try:
        sent = time.perf_counter()
        # The other instance cuts 10 -> 6 (written straight, before this one's next tick).
        assert await other.limits.set(pool, 10, 6, "test: the other instance's cut")
        a.limits.limits[pool] = 10  # this one had not seen it yet when it wrote
        assert not await a.limits.set(pool, 10, 11, "test: a raise computed from 10")
        assert a.limit(pool) == 6
        assert await _readmitted_after(policy, pool, a, sent) < 0.2
    finally:
        await store.close()
