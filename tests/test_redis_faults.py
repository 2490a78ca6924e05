"""Redis faults a production fleet meets: a restart that keeps its data, a failover.

Calls that finish while Redis is unreachable cannot release their concurrency leases. When
Redis comes back with those leases (persistence, a replica promoted), the slots of calls long
finished must not keep refusing new calls for a whole lease TTL.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable

import pytest
import redis

from proxy.admission import StoreUnavailable
from proxy.admission.model import AdmitPlan
from proxy.backend.store import RedisStore
from proxy.metrics import Metrics
from tests.support.admission_helpers import eventually, new_pool, plan
from tests.support.hostile import send
from tests.support.hostile_cases import HAIKU, Case, converse_body, request
from tests.support.processes import Simulator, Sluice
from tests.support.redis_fixtures import RedisClusterProcesses, RedisServerProcess

Factory = Callable[..., RedisServerProcess]


async def test_leases_of_settles_lost_in_an_outage_are_released_once_redis_is_back(
    redis_factory: Factory,
) -> None:
    server = redis_factory("--appendonly", "yes", "--appendfsync", "always")
    store = RedisStore(server.url, timeout_s=0.25)
    await store.start()
    p = plan(new_pool(), pool_concurrency=4, lease_ttl_ms=60_000)
    inspect = redis.Redis.from_url(server.url)
    try:
        leases = [(await store.admit(p, 0)).lease for _ in range(4)]
        assert not (await store.admit(p, 0)).admitted  # the pool is full
        server.kill()  # the four calls finish while Redis is down: their settles fail
        for lease in leases:
            assert lease is not None
            store.settle(p, lease, 0, 0)
        await store.flush()
        assert store.settle_failures == 4
        server.start()  # back with its data (AOF): the four leases with it
        assert int(inspect.zcard(p.keys.pool_leases)) == 4
        back = time.monotonic()
        # Before: the slots stayed taken until the lease TTL (60 s), every call refused.
        await eventually(lambda: int(inspect.zcard(p.keys.pool_leases)) == 0, timeout_s=5)
        print(f"finished calls' slots free {time.monotonic() - back:.2f} s after Redis is back")
        decisions = [await store.admit(p, 0) for _ in range(4)]
        assert all(d.admitted for d in decisions)
        assert store.settle_failures == 4  # the releases sent again are not counted again
    finally:
        inspect.close()
        await store.close()


#: One call's outcome: when it was answered, its status and its x-amzn-ErrorType.
Outcome = tuple[float, int | None, str | None]


async def _drive(
    port: int, body: bytes, n: int, stop: Callable[[], bool], out: list[Outcome]
) -> None:
    """``n`` clients calling back to back until ``stop()``, each answer appended to ``out``."""
    call = Case("call", body)

    async def client() -> None:
        while not stop():
            answer = await send("127.0.0.1", port, call, 10, 10)
            out.append((time.monotonic(), answer.status, answer.headers.get("x-amzn-errortype")))
            if answer.status != 200:
                await asyncio.sleep(0.02)

    await asyncio.gather(*(client() for _ in range(n)))


def _serves(cluster: RedisClusterProcesses, tag: str, not_by: RedisServerProcess) -> bool:
    """True when a live master other than ``not_by`` serves ``{tag}``'s slot."""
    try:
        return cluster.master_of(tag) is not not_by
    except LookupError:  # no master for it (the failover is under way)
        return False


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.long
def test_a_master_failing_over_mid_traffic_leaves_no_slot_held_by_finished_calls(
    make_simulator: Callable[..., Simulator], make_sluice: Callable[..., Sluice]
) -> None:
    """The master of a pool's slot dies with calls running; its replica takes over. Calls
    that finished meanwhile could not release their slots: before, 6 of the pool's 8 stayed
    taken for the lease TTL after the failover (~70% of calls refused 429); now they are
    released as soon as the new master answers."""
    cluster = RedisClusterProcesses(replicas=1, node_timeout_ms=1000).start()
    try:
        pool = "haiku"
        victim = cluster.master_of(pool)
        seed = next(n for n in cluster.nodes if n is not victim)
        sim = make_simulator({"latency_scale": 0.05})
        policy = {
            "server": {
                "store_timeout_ms": 250,
                "lease_ttl_seconds": 60,
                "retry": {"max_retries": 0},
            },
            "identity": {"default_workload": "p2"},
            "models": {pool: {"ids": [HAIKU], "concurrency": 8}},
            "priorities": {"P2": {"share": 1.0, "on_store_failure": "closed"}},
            "workloads": {"p2": {"priority": "P2"}},
        }
        proxy = make_sluice(
            upstream=sim.url, policy=policy, redis_url=f"redis+cluster://127.0.0.1:{seed.port}"
        )
        body = request("POST", f"/model/{HAIKU}/converse", converse_body(random.Random(3), 16))
        outcomes: list[Outcome] = []
        killed: list[float] = []
        elected: list[float] = []  # when the replica became the pool's master

        def fail_over() -> None:
            time.sleep(2)
            victim.kill()  # with six calls running on the pool
            killed.append(time.monotonic())
            while not _serves(cluster, pool, victim):
                assert time.monotonic() - killed[0] < 60, "the replica never took over"
                time.sleep(0.1)
            elected.append(time.monotonic())
            time.sleep(7)

        async def run() -> None:
            faults = asyncio.create_task(asyncio.to_thread(fail_over))
            await _drive(proxy.port, body, 6, faults.done, outcomes)
            await faults

        asyncio.run(run())
        during = [o for o in outcomes if killed[0] < o[0] < elected[0]]
        assert {status for _, status, _ in during} <= {200, 503}, Counter(o[1] for o in during)
        kinds = Counter((kind or "").split(":")[0] for _, s, kind in during if s == 503)
        assert set(kinds) == {"ServiceUnavailableException"}, kinds
        # From 2 s after the replica took over, the pool's 8 slots serve the 6 clients.
        late = Counter(status for t, status, _ in outcomes if t > elected[0] + 2)
        print(f"failover {elected[0] - killed[0]:.1f} s; then {dict(late)}")
        assert late[429] <= 0.05 * sum(late.values()), late
        inspect = redis.RedisCluster(host="127.0.0.1", port=seed.port)
        try:
            deadline = time.monotonic() + 5
            while (held := int(inspect.zcard(f"sluice:{{{pool}}}:leases"))) != 0:
                assert time.monotonic() < deadline, f"{held} slots held with no call running"
                time.sleep(0.1)
        finally:
            inspect.close()
    finally:
        cluster.cleanup()


async def _wake_after_release(waiting: RedisStore, holding: RedisStore, p: AdmitPlan) -> float:
    """Seconds from ``holding`` releasing the pool's one slot to ``waiting``'s waiter getting it."""
    for _ in range(20):  # (the holder is not under test: a cluster client's odd timeout)
        try:
            held = await holding.admit(p, 0)
            break
        except StoreUnavailable:
            await asyncio.sleep(0.2)
    assert held.admitted and held.lease is not None
    waiter = asyncio.create_task(waiting.admit_waiting(p, 0, 5000))
    await asyncio.sleep(0.3)  # listed in Redis's queue, subscribed, asleep
    released = time.monotonic()
    holding.settle(p, held.lease, 0, 0)
    decision = await waiter
    took = time.monotonic() - released
    assert decision.admitted and decision.lease is not None
    waiting.settle(p, decision.lease, 0, 0)
    await waiting.flush()
    return took


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.long  # a cluster with replicas, a failover: ~10 s
async def test_wake_ups_survive_the_death_of_the_cluster_seed() -> None:
    """Waiters are woken through pub/sub on one node, at first the URL's seed. When that
    node dies for good (its replica took over), the listener moves to another node. Before,
    it retried the dead seed forever: every wake-up waited for a poll (~0.2 s instead of
    ~2 ms) and a wake-up error was counted and logged four times a second."""
    cluster = RedisClusterProcesses(replicas=1, node_timeout_ms=1000).start()
    try:
        pool = new_pool()
        owner = cluster.master_of(pool)
        seed = next(n for n in cluster.nodes if n is not owner and "master" in n.cli("role"))
        metrics = Metrics()
        waiting = RedisStore(f"redis+cluster://127.0.0.1:{seed.port}", metrics=metrics)
        holding = RedisStore(f"redis+cluster://127.0.0.1:{owner.port}")
        await waiting.start()
        await holding.start()
        try:
            p = plan(pool, pool_concurrency=1)
            assert await _wake_after_release(waiting, holding, p) < 0.1
            seed.kill()
            killed = time.monotonic()
            while not _serves_all(cluster, seed):
                assert time.monotonic() - killed < 60, "the replica never took over"
                await asyncio.sleep(0.1)
            # Both stores' cluster clients have the new slot map (the holder's admit and the
            # waiter's first attempt are not what this test is about).
            for store in (holding, waiting):
                while True:
                    try:
                        warm = await store.admit(p, 0)
                    except StoreUnavailable:
                        assert time.monotonic() - killed < 60, "the cluster never answered"
                        await asyncio.sleep(0.2)
                        continue
                    assert warm.admitted and warm.lease is not None
                    store.settle(p, warm.lease, 0, 0)
                    await store.flush()
                    break
            await asyncio.sleep(1)
            errors = metrics.registry.get_sample_value(
                "sluice_store_errors_total", {"operation": "wakeup"}
            )
            woken = sorted([await _wake_after_release(waiting, holding, p) for _ in range(5)])
            print(f"wake-ups after the seed died: {woken}")
            assert woken[2] < 0.05, woken
            after = metrics.registry.get_sample_value(
                "sluice_store_errors_total", {"operation": "wakeup"}
            )
            assert after == errors  # no more failures: the listener is on a live node
        finally:
            await waiting.close()
            await holding.close()
    finally:
        cluster.cleanup()


def _serves_all(cluster: RedisClusterProcesses, dead: RedisServerProcess) -> bool:
    """True when a live node reports ``cluster_state:ok`` with ``dead`` marked failed."""
    live = next(n for n in cluster.nodes if n is not dead)
    nodes = live.cli("cluster", "nodes")
    return "cluster_state:ok" in live.cli("cluster", "info") and any(
        f":{dead.port}@" in line and "fail" in line.split()[2] for line in nodes.splitlines()
    )
