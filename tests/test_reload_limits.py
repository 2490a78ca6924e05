"""A reload that turns a pool's adaptive control off leaves no adaptive limit behind."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.app import METRICS, POLICY_REF, STORE, Settings, build_app
from proxy.config import Policy
from proxy.ops.reload import RELOADER, Loaded
from proxy.policy import CompiledPolicy
from tests.support.admission_helpers import Backend

# Bounded: an app's shutdown once hung on a swallowed cancel (see proxy/tasks.py).
pytestmark = [pytest.mark.timeout(90)]

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


def _policy(pool: str, adaptive: bool) -> dict[str, Any]:
    model: dict[str, Any] = {"ids": [HAIKU], "concurrency": 4}
    if adaptive:
        model["adaptive"] = {"ceiling": 4, "initial": 1, "interval_seconds": 0.2}
    return {
        "identity": {"header_mode": True},
        "models": {pool: model},
        "workloads": {"chat": {}},
        "server": {"access_log": False, "adaptivity": {"tick_seconds": 0.1}},
    }


async def test_turning_adaptive_off_by_reload_lifts_the_adaptive_limit(backend: Backend) -> None:
    pool = f"haiku{uuid.uuid4().hex[:8]}"
    app = build_app(
        Policy.model_validate(_policy(pool, True)),
        Settings(upstream="simulator", redis_url=backend.url),
    )
    server = TestServer(app)
    await server.start_server()
    try:
        store: Any = app[STORE]
        deadline = time.monotonic() + 5
        while (await store.pool_stats(pool))["dynamic_limit"] != 1:
            assert time.monotonic() < deadline, "the controller never set its initial limit"
            await asyncio.sleep(0.05)
        # The operator turns adaptive control off: the pool's configured 4 slots hold again.
        new = CompiledPolicy(Policy.model_validate(_policy(pool, False)))
        await app[RELOADER].install(new, Loaded(2, "sha", "test", time.time(), "test"))
        await asyncio.sleep(0.3)
        compiled = app[POLICY_REF].current
        info = compiled.workloads["chat"]
        plan = compiled.plan(info, compiled.pools[pool], info.priority)
        decisions = [await store.admit(plan, 0) for _ in range(4)]
        for d in decisions:
            if d.admitted and d.lease is not None:
                store.settle(plan, d.lease, 0, 0)
        await store.flush()
        assert [d.admitted for d in decisions] == [True] * 4, [d.refused_by for d in decisions]
    finally:
        await server.close()


async def test_the_pool_limit_gauge_follows_a_reload_that_turns_adaptive_off(
    backend: Backend,
) -> None:
    pool = f"haiku{uuid.uuid4().hex[:8]}"
    app = build_app(
        Policy.model_validate(_policy(pool, True)),
        Settings(upstream="simulator", redis_url=backend.url),
    )
    server = TestServer(app)
    await server.start_server()
    try:
        registry = app[METRICS].registry
        deadline = time.monotonic() + 5
        while registry.get_sample_value("sluice_pool_concurrency_limit", {"pool": pool}) != 1:
            assert time.monotonic() < deadline, "the controller never set its initial limit"
            await asyncio.sleep(0.05)
        new = CompiledPolicy(Policy.model_validate(_policy(pool, False)))
        await app[RELOADER].install(new, Loaded(2, "sha", "test", time.time(), "test"))
        # The limit in force is the configured concurrency now, not the retired controller's.
        assert registry.get_sample_value("sluice_pool_concurrency_limit", {"pool": pool}) == 4
    finally:
        await server.close()
