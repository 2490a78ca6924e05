"""Whoever runs a call owns its lease from grant to settle, across cancellation and coalescing.

Cancellation is injected deterministically (:mod:`tests.support.cancellation`): at each
suspension point of the admit stage in turn, on both sides of the await, on every store.
After each run the pool's in-flight count (the store's and the gauge) is back to 0.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from proxy.admission import AdmitPlan, Decision, Store
from proxy.admission.gate import Gate
from proxy.app import METRICS, POLICY, STORE, Settings, build_app
from proxy.backend.cache import open_cache
from proxy.backend.store import open_store
from proxy.config import Policy
from proxy.log import AccessLog
from proxy.metrics import Metrics
from proxy.ops.live import LIVE
from proxy.pipeline import Pipeline
from proxy.pipeline.admit import Admission
from proxy.pipeline.call import Call
from proxy.pipeline.identify import Caller
from proxy.pipeline.settle import Settler
from proxy.policy import CompiledPolicy
from proxy.routes import match
from tests.support.admission_helpers import Backend, eventually
from tests.support.cancellation import run_cancelled_at

SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
BODY = orjson.dumps(
    {
        "messages": [{"role": "user", "content": [{"text": "hi"}]}],
        "inferenceConfig": {"maxTokens": 8},
    }
)


def compiled(tag: str) -> CompiledPolicy:
    # sonnet has one slot: "queued" waits for it, "fallback" is downgraded to haiku.
    return CompiledPolicy(
        Policy.model_validate(
            {
                "identity": {"header_mode": True},
                "models": {
                    f"sonnet{tag}": {"ids": [SONNET], "concurrency": 1},
                    f"haiku{tag}": {"ids": [HAIKU], "concurrency": 4},
                },
                "workloads": {
                    "direct": {},
                    "queued": {"max_wait_ms": 5000},
                    "fallback": {"degrade": [f"haiku{tag}"]},
                },
            }
        )
    )


class Rig:
    """The admit and settle stages over one real store, as the pipeline wires them."""

    def __init__(self, store: Store, policy: CompiledPolicy, tag: str) -> None:
        self.store, self.policy, self.tag = store, policy, tag
        self.metrics = Metrics()
        gate = Gate(store, self.metrics)
        self.admission = Admission(gate, open_cache(None), self.metrics, None)
        self.settler = Settler(gate, self.metrics, AccessLog(enabled=False), None)
        self.route = match("POST", f"/model/{SONNET}/converse")
        self.blocker: tuple[AdmitPlan, str] | None = None

    def caller(self, workload: str) -> Caller:
        info = self.policy.workloads[workload]
        return Caller(info, info.priority, "header")

    async def block_sonnet(self) -> None:
        """Take sonnet's only slot, as another request would."""
        info = self.policy.workloads["direct"]
        plan = self.policy.plan(info, self.policy.pools[f"sonnet{self.tag}"], info.priority)
        decision = await self.store.admit(plan, 0)
        assert decision.admitted and decision.lease is not None
        self.blocker = (plan, decision.lease)

    def unblock(self, _: int = 0) -> None:
        if self.blocker is not None:
            plan, lease = self.blocker
            self.blocker = None
            self.store.settle(plan, lease, 0, 0)

    async def owner_runs(self, call: Call, caller: Caller) -> None:
        """What the pipeline does with a call: admit, and settle in ``finally`` whatever happens."""
        try:
            await self.admission.admit(call, self.route, caller)
        finally:
            self.settler.settle(call)

    async def assert_nothing_held(self) -> None:
        self.unblock()
        await self.store.flush()
        for pool in (f"sonnet{self.tag}", f"haiku{self.tag}"):
            stats = await self.store.pool_stats(pool)
            assert stats["in_flight"] == 0, pool
            gauge = self.metrics.registry.get_sample_value("sluice_in_flight", {"pool": pool})
            assert gauge in (None, 0.0), pool


@pytest.fixture
async def rig(backend: Backend) -> AsyncIterator[Rig]:
    store = open_store(backend.url)
    await store.start()
    tag = uuid.uuid4().hex[:8]
    try:
        yield Rig(store, compiled(tag), tag)
    finally:
        await store.close()


@pytest.mark.parametrize("workload", ["direct", "queued", "fallback"])
@pytest.mark.parametrize("side", ["before", "after"])
async def test_cancelling_admit_at_any_await_point_leaves_no_lease(
    rig: Rig, backend: Backend, workload: str, side: str
) -> None:
    caller = rig.caller(workload)
    injected = 0
    for at in range(50):
        if workload != "direct":
            await rig.block_sonnet()
        call = Call(f"req-{at}", 0.0, rig.policy, route=rig.route, caller=caller, body=BODY)
        # "queued" is admitted only once the blocker leaves: it leaves at the first suspension.
        hook: Any = rig.unblock if workload == "queued" else None
        if not await run_cancelled_at(rig.owner_runs(call, caller), at, side, hook):
            assert call.ticket is not None, "the uncancelled run must be admitted"
            await rig.assert_nothing_held()
            break
        injected += 1
        await rig.assert_nothing_held()
    else:
        raise AssertionError("admit never finished")
    if backend.shared:
        assert injected >= 1  # a Redis admit always suspends at least once


async def test_a_grant_is_given_back_once_and_a_new_grant_on_the_call_in_turn(
    rig: Rig,
) -> None:
    # A stage that re-admits mid-call (downgrade after a throttle, another tier) settles,
    # then stores the new grant on the call: the final settle must release that one, and
    # settling twice must not give anything back twice.
    caller = rig.caller("direct")
    call = Call("req", 0.0, rig.policy, route=rig.route, caller=caller, body=BODY)
    await rig.admission.admit(call, rig.route, caller)
    first = call.ticket
    assert first is not None
    rig.settler.settle(call)
    rig.settler.settle(call)
    await rig.admission.admit(call, rig.route, caller)  # sonnet's one slot is free again
    assert call.ticket is not None and call.ticket is not first
    rig.settler.settle(call)
    await rig.assert_nothing_held()
    gauge = rig.metrics.registry.get_sample_value("sluice_in_flight", {"pool": f"sonnet{rig.tag}"})
    assert gauge == 0.0  # not -1: the first grant was counted back once


async def test_grant_delivered_to_a_cancelled_caller_goes_back_to_the_store(
    rig: Rig, backend: Backend
) -> None:
    """The store alone: cancelled after its grant was delivered, before the caller resumed."""
    info = rig.policy.workloads["direct"]
    plan = rig.policy.plan(info, rig.policy.pools[f"sonnet{rig.tag}"], info.priority)
    seen: list[Decision] = []

    async def admit() -> None:
        seen.append(await rig.store.admit(plan, 0))

    # The embedded store decides without suspending: there is no such moment to hit.
    assert await run_cancelled_at(admit(), 0, "after") == backend.shared
    for decision in seen:  # a decision the caller did see is the caller's to settle
        assert decision.lease is not None
        rig.store.settle(plan, decision.lease, 0, 0)
    await rig.assert_nothing_held()
    assert (await rig.store.admit(plan, 0)).admitted  # the one slot is free again


def _waiting_on(pipeline: Pipeline) -> int:
    """Requests waiting on coalesced flights (leaders included)."""
    return sum(flight.waiters for flight in pipeline.coalescer._flights.values())


async def test_coalescing_leader_that_leaves_hands_its_lease_to_the_flight(
    backend: Backend,
) -> None:
    # The pool's only slot is taken, so the leader's flight queues in admission; a
    # follower joins; the leader's client leaves; then the slot frees. The flight is
    # admitted for the follower and must settle that grant itself.
    tag = uuid.uuid4().hex[:8]
    pool = f"haiku{tag}"
    policy = Policy.model_validate(
        {
            "identity": {"header_mode": True},
            "models": {pool: {"ids": [HAIKU], "concurrency": 1}},
            "workloads": {"faq": {"cache": {"ttl_seconds": 60}, "max_wait_ms": 20000}},
        }
    )
    app = build_app(policy, Settings(upstream="simulator", redis_url=backend.url))
    server = TestServer(app, handler_cancellation=True)
    await server.start_server()
    try:
        store: Any = app[STORE]
        compiled = app[POLICY]
        info = compiled.workloads["faq"]
        plan = compiled.plan(info, compiled.pools[pool], info.priority)
        blocker = await store.admit(plan, 0)
        assert blocker.admitted
        async with aiohttp.ClientSession() as session:

            async def ask() -> tuple[int, dict[str, str]]:
                async with session.post(
                    server.make_url(f"/model/{HAIKU}/converse"),
                    data=BODY,
                    headers={"x-sluice-workload": "faq", "Content-Type": "application/json"},
                ) as response:
                    await response.read()
                    return response.status, dict(response.headers)

            leader = asyncio.create_task(ask())
            await eventually(lambda: store.waiting(pool) == 1)
            follower = asyncio.create_task(ask())
            await eventually(lambda: _waiting_on(app[LIVE].proxy) == 2)
            leader.cancel()
            await eventually(lambda: _waiting_on(app[LIVE].proxy) == 1)
            store.settle(plan, blocker.lease, 0, 0)
            status, headers = await asyncio.wait_for(follower, 30)
        assert status == 200 and headers["x-sluice-coalesced"] == "1"
        await store.flush()
        assert (await store.pool_stats(pool))["in_flight"] == 0
        metrics = app[METRICS].registry
        assert metrics.get_sample_value("sluice_in_flight", {"pool": pool}) == 0.0
    finally:
        await server.close()
