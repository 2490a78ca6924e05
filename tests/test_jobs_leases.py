"""A batch worker gives back every admission grant it takes, whatever fails after the grant.

A grant the worker drops stays in the store's lease book, whose heartbeat renews it for
as long as the process lives: one slot of the pool lost for good per failure.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import POLICY_REF, STORE, Settings, build_app
from proxy.config import Policy
from proxy.jobs.queue import QueueUnavailable
from proxy.jobs.runtime import JOBS
from proxy.policy import CompiledPolicy
from tests.support.admission_helpers import Backend
from tests.support.jobs_helpers import HAIKU, jobs_policy, jsonl, record

# Bounded: a cancel swallowed in the worker's Redis path once hung this app's shutdown
# (proxy/tasks.py re-sends it now); a regression fails here, not at CI's deadline.
pytestmark = [pytest.mark.timeout(90)]


@dataclass
class Rig:
    app: web.Application
    server: TestServer
    pool: str
    policy: dict[str, Any]

    async def submit(self, n: int) -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                self.server.make_url(f"/sluice/v1/batches?modelId={HAIKU}"),
                data=jsonl([record(i) for i in range(n)]),
                headers={"x-sluice-workload": "enrich"},
            ) as resp,
        ):
            body = await resp.read()
            assert resp.status == 202, body
            return str(json.loads(body)["batchId"])

    async def in_flight(self) -> float:
        store: Any = self.app[STORE]
        await store.flush()
        return float((await store.pool_stats(self.pool))["in_flight"])


@pytest.fixture
async def rig(backend: Backend, tmp_path: Path) -> AsyncIterator[Rig]:
    pool = f"haiku{uuid.uuid4().hex[:8]}"
    policy = jobs_policy(jobs={"workers": 1, "sqlite_path": str(tmp_path / "jobs.sqlite3")})
    policy["models"] = {pool: policy["models"].pop("haiku")}
    app = build_app(
        Policy.model_validate(policy),
        Settings(upstream="simulator", redis_url=backend.url, fleet=f"test-{uuid.uuid4().hex}"),
    )
    server = TestServer(app)
    await server.start_server()
    try:
        yield Rig(app, server, pool, policy)
    finally:
        await server.close()


def fail_once(queue: Any, name: str, before: Callable[[], Awaitable[None]]) -> asyncio.Event:
    """Make ``queue.<name>`` run ``before`` on its first call (it may raise); set when called."""
    real = getattr(queue, name)
    called = asyncio.Event()

    async def wrapped(*args: Any, **kw: Any) -> Any:
        if not called.is_set():
            called.set()
            await before()
        return await real(*args, **kw)

    setattr(queue, name, wrapped)
    return called


async def settles_to_zero(rig: Rig, timeout_s: float = 4.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (held := await rig.in_flight()) != 0:
        assert time.monotonic() < deadline, f"{held:g} slot(s) of {rig.pool} still held"
        await asyncio.sleep(0.05)


async def test_a_batch_submit_to_an_in_process_app_is_accepted(rig: Rig) -> None:
    # The batch routes keep request-scoped state under a typed key: a plain str key warns
    # (NotAppKeyWarning), which the test config turns into an error and a 500.
    assert await rig.submit(1)


async def test_a_queue_error_after_admission_gives_the_workers_grant_back(rig: Rig) -> None:
    # The worker is admitted, claims a record, then reads the batch's metadata: a queue
    # blip there must not keep the slot it was granted.
    async def blip() -> None:
        raise QueueUnavailable("injected: the queue does not answer")

    called = fail_once(rig.app[JOBS].queue, "batch", blip)
    await rig.submit(1)
    await asyncio.wait_for(called.wait(), 5)
    await asyncio.sleep(0.2)
    await settles_to_zero(rig)


async def test_a_workload_removed_by_a_reload_mid_record_gives_the_grant_back(rig: Rig) -> None:
    # A reload lands between the worker's admission and its processing of the record.
    ref = rig.app[POLICY_REF]
    doc = json.loads(json.dumps(rig.policy))
    del doc["workloads"]["enrich"]
    doc["priorities"].pop("batch")
    without = CompiledPolicy(Policy.model_validate(doc))

    async def reload() -> None:
        ref.swap(without)

    called = fail_once(rig.app[JOBS].queue, "batch", reload)
    await rig.submit(1)
    await asyncio.wait_for(called.wait(), 5)
    await asyncio.sleep(0.2)
    await settles_to_zero(rig)
