"""Grants taken ahead of demand (proxy/backend/ahead.py), against a real Redis.

What must hold whatever the limits: a request admitted from a grant held ahead was
debited in Redis before it was used (no limit is exceeded, across processes too);
every unused grant comes back whole (lease, tokens and request); near any limit no
grant is held ahead, so decisions there are Redis's own; and a roomy plan's requests
are admitted with no round trip on their path (Redis paused, they still get through).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from botocore.exceptions import ClientError

from proxy.admission import StoreUnavailable
from proxy.admission.decision import Snapshot, roomy
from proxy.admission.model import AdmitPlan, Bucket
from proxy.backend.ahead import Ahead
from proxy.backend.store import RedisStore
from proxy.config import parse_policy
from proxy.metrics import Metrics
from proxy.policy import CompiledPolicy
from tests.support.admission_helpers import new_pool, per_min, plan
from tests.support.processes import Simulator, Sluice, bedrock_client, metric_value
from tests.support.redis_fixtures import RedisServerProcess

ROOT = Path(__file__).resolve().parent.parent
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


def _store(url: str, per_plan: int = 2, ttl_s: float = 0.3) -> tuple[RedisStore, Metrics]:
    metrics = Metrics()
    # A store timeout well above a loaded machine's hiccups: no test here is about timeouts.
    store = RedisStore(url, metrics=metrics, ahead=Ahead(per_plan, ttl_s), timeout_s=2.0)
    return store, metrics


def _count(metrics: Metrics, outcome: str) -> float:
    return metrics.grants_ahead.labels(outcome=outcome)._value.get()  # type: ignore[no-any-return]


async def _settled(store: RedisStore) -> None:
    """Wait for every queued admit and settle to land (background ones included)."""
    for _ in range(3):
        await store.flush()
        await asyncio.sleep(0.01)


def _levels(client: redis.Redis, p: AdmitPlan) -> tuple[float, float, float, float, int]:
    """Pool rpm/tpm levels, workload rpm/tpm levels (requests/tokens) and pool leases."""
    sec, usec = client.time()
    now = sec * 1000 + usec / 1000
    raw = client.hmget(p.keys.pool, ["p", f"w:{p.workload}"])

    def lv(packed: bytes | None, i: int, b: Bucket | None) -> float:
        if b is None:
            return 0.0
        tat = struct.unpack("<dd", packed)[i] if packed else 0.0
        return b.burst - max(0.0, tat - now) * b.rate_per_s / 1000

    return (
        lv(raw[0], 0, p.pool_requests),
        lv(raw[0], 1, p.pool_tokens),
        lv(raw[1], 0, p.workload_requests),
        lv(raw[1], 1, p.workload_tokens),
        int(client.zcard(p.keys.pool_leases)),
    )


# --- the predicate ------------------------------------------------------------------------


def test_roomy_needs_half_of_every_limit_free_after_the_extra_grants() -> None:
    p = plan("x", pool_requests=per_min(600, 100), pool_concurrency=10)
    full = Snapshot(100.0, 0.0, 1, 10, 0.0, 0.0, 0)
    assert roomy(p, full, 5, 2)
    assert not roomy(p, full._replace(p_in=4), 5, 2)  # 10 - 4 - 2 = 4 < 5 slots
    assert roomy(p, full._replace(p_in=3), 5, 2)  # exactly half left
    assert not roomy(p, full._replace(p_rlevel=51.0), 5, 2)  # 49 requests < 50
    assert not roomy(p, full._replace(p_rlevel=-3.0), 5, 0)  # debt
    shared = plan("x", share=0.5, pool_tokens=per_min(6000, 1000))
    # A class with half the bucket sees level - 500: 900 -> 400 of its 500 left.
    assert roomy(shared, Snapshot(0.0, 900.0, 1, -1, 0.0, 0.0, 0), 50, 2)
    assert not roomy(shared, Snapshot(0.0, 900.0, 1, -1, 0.0, 0.0, 0), 100, 2)
    zero = plan("x", workload_concurrency=0)
    assert not roomy(zero, Snapshot(0.0, 0.0, 0, -1, 0.0, 0.0, 0), 1, 0)


def test_ahead_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="per plan"):
        Ahead(0)
    with pytest.raises(ValueError, match="ttl"):
        Ahead(2, 0.0)


# --- one store ----------------------------------------------------------------------------


async def test_roomy_plan_is_admitted_while_redis_is_paused(
    redis_server: RedisServerProcess,
) -> None:
    metrics = Metrics()
    store = RedisStore(redis_server.url, metrics=metrics, ahead=Ahead(2, 10.0), timeout_s=0.25)
    await store.start()
    try:
        p = plan(new_pool(), pool_requests=per_min(6000, 500), pool_concurrency=100)
        first = await store.admit(p, 10)  # a round trip; two more are asked for behind it
        assert first.admitted
        await _settled(store)
        client = redis.Redis.from_url(redis_server.url)
        client.execute_command("CLIENT", "PAUSE", 2000, "ALL")
        started = time.monotonic()
        got = [await asyncio.wait_for(store.admit(p, 10), 0.1) for _ in range(2)]
        took = time.monotonic() - started
        assert all(d.admitted and d.lease for d in got)
        assert took < 0.5  # no round trip: Redis answers nothing for 2 s
        assert got[0].remaining_requests is not None and got[0].remaining_requests > 250
        # A third finds nothing held (the refills wait for Redis): it asks Redis itself.
        with pytest.raises(StoreUnavailable):
            await store.admit(p, 10)
        await asyncio.sleep(2.2)
        await _settled(store)
        assert _count(metrics, "used") == 2
        # What Redis granted late (the third request's admit, the replacements asked during
        # the pause) went back: only the three admitted requests hold leases.
        assert redis.Redis.from_url(redis_server.url).zcard(p.keys.pool_leases) == 3
        for d in [first, *got]:
            assert d.lease is not None
            store.settle(p, d.lease, 10, 10)
    finally:
        await store.close()


async def test_near_any_limit_nothing_is_held_ahead(redis_server: RedisServerProcess) -> None:
    store, metrics = _store(redis_server.url)
    await store.start()
    try:
        pool = new_pool()
        tight = [
            plan(pool, "a", pool_concurrency=4),  # 1 in flight + 2 ahead leaves 1 of 4
            plan(pool, "b", workload_requests=per_min(60, 4)),
            plan(pool, "c", pool_tokens=per_min(6000, 100)),  # 40-token requests
        ]
        for p in tight:
            d = await store.admit(p, 40)
            assert d.admitted
            await _settled(store)
            assert _count(metrics, "kept") == 0, p
            assert d.lease is not None
            store.settle(p, d.lease, 40, 40)
        await _settled(store)
        assert redis.Redis.from_url(redis_server.url).zcard(tight[0].keys.pool_leases) == 0
        # The control: the same store does hold grants for a plan far from its limits.
        roomy_plan = plan(pool, "d", pool_concurrency=100)
        d = await store.admit(roomy_plan, 40)
        await _settled(store)
        assert _count(metrics, "kept") == 2
        assert d.lease is not None
        store.settle(roomy_plan, d.lease, 40, 40)
    finally:
        await store.close()


async def test_unused_grants_come_back_whole(redis_server: RedisServerProcess) -> None:
    """Seeded sweep over limits: after every request settled and the grants ahead expired,
    Redis holds no lease and every bucket is where the requests alone put it."""
    client = redis.Redis.from_url(redis_server.url)
    rng = random.Random(20261207)
    store, metrics = _store(redis_server.url, per_plan=rng.randint(1, 4), ttl_s=0.2)
    await store.start()
    try:
        for _ in range(6):
            # Slow refill (per hour): the levels move only by what was taken and given back.
            burst_r, burst_t = rng.randint(40, 400), rng.randint(4000, 40000)
            p = plan(
                new_pool(),
                share=rng.choice([1.0, 0.8]),
                pool_requests=Bucket(1 / 3600, burst_r),
                pool_tokens=Bucket(1 / 3600, burst_t),
                pool_concurrency=rng.choice([None, 200]),
                workload_requests=Bucket(1 / 3600, burst_r),
                workload_tokens=Bucket(1 / 3600, burst_t),
            )
            n, used_tokens = rng.randint(3, 12), 0
            for _ in range(n):
                reserved = rng.randint(20, 60)
                d = await store.admit(p, reserved)
                assert d.admitted and d.lease is not None
                actual = rng.randint(0, reserved)
                used_tokens += actual
                store.settle(p, d.lease, reserved, actual)
                await asyncio.sleep(rng.choice([0, 0, 0.005]))
            await asyncio.sleep(0.6)  # every grant ahead expired and went back
            await _settled(store)
            pr, pt, wr, wt, leases = _levels(client, p)
            assert leases == 0
            for level, burst, used in ((pr, burst_r, n), (wr, burst_r, n)):
                assert level == pytest.approx(burst - used, abs=0.05)
            for level in (pt, wt):
                assert level == pytest.approx(burst_t - used_tokens, abs=0.5)
        assert _count(metrics, "used") > 0 and _count(metrics, "returned") > 0
    finally:
        await store.close()


async def test_close_gives_every_held_grant_back(redis_server: RedisServerProcess) -> None:
    store, metrics = _store(redis_server.url, per_plan=3, ttl_s=60.0)
    await store.start()
    p = plan(new_pool(), pool_requests=Bucket(1 / 3600, 100), pool_concurrency=50)
    d = await store.admit(p, 5)
    await _settled(store)
    assert _count(metrics, "kept") == 3
    assert d.lease is not None
    store.settle(p, d.lease, 5, 5)
    await store.close()
    pr, _, _, _, leases = _levels(redis.Redis.from_url(redis_server.url), p)
    assert leases == 0 and pr == pytest.approx(99, abs=0.05)


async def test_a_burst_is_not_refused_for_grants_held_ahead_of_it(
    redis_server: RedisServerProcess,
) -> None:
    """Replacements asked for by requests that used a held grant go out behind the
    requests queued with them: eight at once on a limit of ten with one in flight all pass."""
    store, metrics = _store(redis_server.url, ttl_s=5.0)
    await store.start()
    try:
        p = plan(new_pool(), pool_concurrency=10)
        first = await store.admit(p, 1)
        await _settled(store)
        assert _count(metrics, "kept") == 2  # 1 in flight + 2 held: 7 of 10 free
        burst = await asyncio.gather(*(store.admit(p, 1) for _ in range(8)))
        assert all(d.admitted for d in burst), [d.refused_by for d in burst]
        await _settled(store)
        client = redis.Redis.from_url(redis_server.url)
        assert client.zcard(p.keys.pool_leases) == 9  # the replacements did not stay
        for d in [first, *burst]:
            assert d.lease is not None
            store.settle(p, d.lease, 1, 1)
        await _settled(store)
        assert client.zcard(p.keys.pool_leases) == 0
    finally:
        await store.close()


async def test_contention_gives_back_at_once_and_takes_none_for_a_while(
    redis_server: RedisServerProcess,
) -> None:
    store, metrics = _store(redis_server.url, ttl_s=2.0)
    await store.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        pool = new_pool()
        roomy_b = plan(pool, "b", pool_concurrency=100)
        own_cap = plan(pool, "a", pool_concurrency=100, workload_requests=Bucket(1 / 3600, 1))
        small_class = plan(pool, "c", share=0.1, pool_concurrency=100)

        async def hold_b() -> list[Any]:
            d = await store.admit(roomy_b, 1)
            await _settled(store)
            return [d]

        held = await hold_b()
        assert store._desk is not None and store._desk.ahead.held(pool) == 2
        # A workload refused by its own limit gives back its own plan's grants only.
        assert (await store.admit(own_cap, 1)).admitted
        refused = await store.admit(own_cap, 1)
        assert refused.refused_by == "workload.requests_per_minute"
        await _settled(store)
        assert store._desk.ahead.held(pool) == 2
        # A class refused by its share of the pool: every grant on the pool goes back.
        # (its ceiling, 10% of 100, counts the whole pool's in-flight: held grants too)
        ds = []
        while not ds or ds[-1].admitted:
            ds.append(await store.admit(small_class, 1))
        assert ds[-1].refused_by == "class.concurrency" and len(ds) <= 10
        await _settled(store)
        assert store._desk.ahead.held(pool) == 0
        assert client.zcard(roomy_b.keys.pool_leases) == 1 + 1 + len(ds) - 1
        # ... and none is kept for the quiet time, however roomy the plan looks.
        kept = _count(metrics, "kept")
        held += await hold_b()
        assert _count(metrics, "kept") == kept
        await asyncio.sleep(2.1)  # the quiet time is over
        held += await hold_b()
        assert _count(metrics, "kept") == kept + 2
        # A throttle (the controller calls shed_ahead) gives them back at once too.
        store.shed_ahead(pool)
        await _settled(store)
        assert store._desk.ahead.held(pool) == 0
        for d in [*held, *ds]:
            if d.admitted:
                store.settle(roomy_b if d in held else small_class, d.lease, 1, 1)
    finally:
        await store.close()


def test_a_pool_with_adaptive_concurrency_holds_nothing_ahead() -> None:
    compiled = CompiledPolicy(
        parse_policy(
            {
                "models": {
                    "steady": {"ids": ["anthropic.a"], "concurrency": 40},
                    "moving": {
                        "ids": ["anthropic.b"],
                        "concurrency": 40,
                        "adaptive": {"floor": 2, "ceiling": 40},
                    },
                },
                "priorities": {"P0": {"share": 1.0}},
                "workloads": {"w": {"priority": "P0"}},
            }
        ),
        env={},
    )
    w = compiled.workloads["w"]
    assert compiled.plan(w, compiled.pools["steady"], "P0").hold_ahead
    assert not compiled.plan(w, compiled.pools["moving"], "P0").hold_ahead


async def test_no_grant_is_held_ahead_for_a_plan_that_says_so(
    redis_server: RedisServerProcess,
) -> None:
    store, metrics = _store(redis_server.url)
    await store.start()
    try:
        p = dataclasses.replace(plan(new_pool(), pool_concurrency=100), hold_ahead=False)
        for _ in range(3):
            d = await store.admit(p, 1)
            await _settled(store)
            assert d.lease is not None
            store.settle(p, d.lease, 1, 1)
        assert _count(metrics, "kept") == _count(metrics, "used") == 0
    finally:
        await store.close()


async def test_asks_never_hold_a_request_back_and_redis_keeps_half_free(
    redis_server: RedisServerProcess,
) -> None:
    """Two instances on one pool of 10 slots. A replacement asked for on a snapshot that
    was roomy when its grant was taken is refused by Redis itself once the pool is half
    full (the ask goes with half the class share): nothing is debited, no slot is taken."""
    one, m1 = _store(redis_server.url, ttl_s=5.0)
    two, _ = _store(redis_server.url, per_plan=1, ttl_s=5.0)
    await one.start()
    await two.start()
    try:
        pool = new_pool()
        p1, p2 = plan(pool, "one", pool_concurrency=10), plan(pool, "two", pool_concurrency=10)
        first = await one.admit(p1, 1)
        await _settled(one)
        assert _count(m1, "kept") == 2  # 3 of 10 taken
        others = [await two.admit(p2, 1) for _ in range(3)]  # 6 of 10
        await _settled(two)
        used = await one.admit(p1, 1)  # a held grant: its replacement is asked for
        q = one._queues[p1.scope]
        await asyncio.sleep(0)
        # The ask went out on its own: a request arriving now is not held behind it.
        assert q.ahead_busy and not q.admit_busy
        await _settled(one)
        assert _count(m1, "refused") == 1 and _count(m1, "declined") == 0
        # Refused at half: the held grant left went back too (a sign of contention).
        client = redis.Redis.from_url(redis_server.url)
        assert client.zcard(p1.keys.pool_leases) == 2 + 3
        for s, p, d in [(one, p1, first), (one, p1, used), *((two, p2, d) for d in others)]:
            assert d.lease is not None
            s.settle(p, d.lease, 1, 1)
        await _settled(one)
        await _settled(two)
        assert client.zcard(p1.keys.pool_leases) <= 1  # two's own replacement, if any
    finally:
        await one.close()
        await two.close()


# --- several processes --------------------------------------------------------------------

WORKER = r"""
import asyncio, json, sys, time
from proxy.backend.ahead import Ahead
from proxy.backend.store import RedisStore
from tests.support.admission_helpers import plan, per_min

async def main(url, pool, start):
    store = RedisStore(url, ahead=Ahead(3, 5.0), timeout_s=2.0)
    await store.start()
    p = plan(pool, pool_requests=per_min(1, 60), pool_concurrency=1000)
    while time.time() < start:
        await asyncio.sleep(0.001)
    admitted = 0
    for _ in range(40):
        d = await store.admit(p, 0)
        admitted += d.admitted
    print(json.dumps(admitted), flush=True)
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


@pytest.mark.slow
def test_four_processes_holding_grants_ahead_never_admit_beyond_the_burst(
    redis_server: RedisServerProcess,
) -> None:
    pool, start = new_pool(), time.time() + 5.0  # every worker started and connected
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, redis_server.url, pool, str(start)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(4)
    ]
    admitted = [json.loads(proc.communicate(timeout=60)[0]) for proc in procs]
    # 160 requests on a burst of 60 (one more per minute): grants ahead are debited
    # before use, so the fleet never admits beyond the bucket; those still held when a
    # process ran out of requests went back, so at most 4 x 3 are missing.
    assert 60 - 12 <= sum(admitted) <= 61
    client = redis.Redis.from_url(redis_server.url)
    p = plan(pool, pool_requests=per_min(1, 60), pool_concurrency=1000)
    # The workers never settle: what is left is exactly the leases of admitted requests
    # (every grant still held ahead went back when its process closed its store).
    assert client.zcard(p.keys.pool_leases) == sum(admitted)


# --- through Sluice -----------------------------------------------------------------------


def test_sluice_admits_from_grants_ahead_and_counts_them(
    redis_server: RedisServerProcess, sim: Simulator, make_sluice: Any
) -> None:
    pool = new_pool()
    policy: dict[str, Any] = {
        "server": {"lease_ttl_seconds": 5, "grants_ahead": 2},
        "models": {
            pool: {
                "ids": [HAIKU],
                "requests_per_minute": 600000,
                "tokens_per_minute": 600000000,
                "concurrency": 1000,
            }
        },
        "priorities": {"default": {"share": 1.0}},
        "workloads": {"default": {"priority": "default"}},
        "identity": {"default_workload": "default"},
    }
    proxy: Sluice = make_sluice(upstream=sim.url, policy=policy, redis_url=redis_server.url)
    client = bedrock_client(proxy.url)
    body = json.dumps(
        {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 20,
            "messages": [{"role": "user", "content": "hi"}],
        }
    )
    for _ in range(20):
        out = client.invoke_model(modelId=HAIKU, body=body)
        headers = out["ResponseMetadata"]["HTTPHeaders"]
        # A grant held ahead answers with the levels Redis reported when it was granted.
        assert 0 < int(headers["x-ratelimit-remaining-requests"]) <= 100000
        assert headers["x-sluice-pool"] == pool
    text = proxy.metrics()
    assert metric_value(text, "sluice_grants_ahead_total", outcome="used") >= 15
    assert metric_value(text, "sluice_admitted_total") >= 20

    # A throttle from Bedrock: every grant held on the pool goes back at once, and the
    # throttled call's retry finds no slot held by a grant nobody uses.
    returned = metric_value(proxy.metrics(), "sluice_grants_ahead_total", outcome="returned")
    held_before = metric_value(proxy.metrics(), "sluice_grants_ahead_total", outcome="kept") - (
        metric_value(proxy.metrics(), "sluice_grants_ahead_total", outcome="used") + returned
    )
    assert held_before >= 1
    sim.configure({"models": {HAIKU: {"faults": {"throttle_rate": 1.0}}}})
    try:
        with pytest.raises(ClientError):
            bedrock_client(proxy.url, retries={"total_max_attempts": 1}).invoke_model(
                modelId=HAIKU, body=body
            )
    finally:
        sim.configure({"models": {HAIKU: {"faults": {"throttle_rate": 0.0}}}})
    text = proxy.metrics()
    assert metric_value(text, "sluice_grants_ahead_total", outcome="returned") >= returned + 1
    # ... and none is taken for a while: an expiry would not have stopped new ones.
    kept = metric_value(text, "sluice_grants_ahead_total", outcome="kept")
    client.invoke_model(modelId=HAIKU, body=body)
    assert metric_value(proxy.metrics(), "sluice_grants_ahead_total", outcome="kept") == kept

    off = make_sluice(  # the default: none
        upstream=sim.url,
        policy={**policy, "server": {"lease_ttl_seconds": 5}},
        redis_url=redis_server.url,
    )
    bedrock_client(off.url).invoke_model(modelId=HAIKU, body=body)
    assert metric_value(off.metrics(), "sluice_grants_ahead_total") == 0


@pytest.mark.parametrize("value", [-1, 65, "two"])
def test_a_grants_ahead_setting_out_of_range_is_refused_naming_it(
    value: Any, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        json.dumps(
            {
                "server": {"grants_ahead": value},
                "models": {"m": {"ids": [HAIKU]}},
                "priorities": {"P0": {"share": 1.0}},
                "workloads": {"w": {"priority": "P0"}},
            }
        )
    )
    for argv in (["policy", "check", str(bad)], ["serve", "--config", str(bad), "--port", "0"]):
        out = subprocess.run(
            [sys.executable, "-m", "proxy", *argv],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
            timeout=60,
        )
        # policy check: 1 (the policy is invalid); serve: 2 (it cannot start)
        assert out.returncode == (1 if argv[0] == "policy" else 2), (argv, out.stderr)
        assert "server.grants_ahead" in out.stderr, out.stderr


@pytest.mark.slow
def test_cancelled_callers_and_a_killed_instance_leave_nothing_held_beyond_the_ttl(
    redis_server: RedisServerProcess, make_simulator: Any, make_sluice: Any
) -> None:
    """Two instances holding grants ahead on a pool of 20 slots. 8 callers (light: grants
    are held) for 1.5 s, some giving up mid-call (a 50 ms read timeout against a 0.1-0.5 s
    model); then one instance is SIGKILLed with grants held and calls in flight, and 40
    callers saturate the pool. Bedrock never sees more than 20 at once, and every slot is
    free again within the lease TTL (2 s) plus a grant's time (1 s) of the kill."""
    sim = make_simulator({"latency_scale": 0.2})
    pool, ttl, cap = new_pool(), 2, 20
    policy: dict[str, Any] = {
        "server": {"lease_ttl_seconds": ttl, "grants_ahead": 2},
        "models": {pool: {"ids": [HAIKU], "requests_per_minute": 600000, "concurrency": cap}},
        "priorities": {"default": {"share": 1.0}},
        "workloads": {"default": {"priority": "default"}},
        "identity": {"default_workload": "default"},
    }
    a = make_sluice(upstream=sim.url, policy=policy, redis_url=redis_server.url)
    b = make_sluice(upstream=sim.url, policy=policy, redis_url=redis_server.url)
    body = json.dumps(
        {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 40,
            "messages": [{"role": "user", "content": "tell me something"}],
        }
    )
    rng = random.Random(77)
    clients = [
        bedrock_client(
            (a if i % 2 or i >= 8 else b).url,  # after the kill every caller goes to a
            read_timeout=0.05 if rng.random() < 0.4 else 30,
            retries={"total_max_attempts": 1},
        )
        for i in range(40)
    ]
    start = time.monotonic()
    heavy, deadline = start + 1.5, start + 3.0
    outcomes: list[str] = []

    def run(i: int) -> None:
        if i >= 8:
            time.sleep(max(0.0, heavy - time.monotonic()))
        while time.monotonic() < deadline:
            try:
                clients[i].invoke_model(modelId=HAIKU, body=body)
                outcomes.append("ok")
            except Exception as exc:  # a read timeout, a refusal, the killed instance
                outcomes.append(type(exc).__name__)

    with ThreadPoolExecutor(40) as ex:
        futures = [ex.submit(run, i) for i in range(40)]
        time.sleep(1.5)
        used = metric_value(a.metrics(), "sluice_grants_ahead_total", outcome="used")
        b.kill()  # SIGKILL: grants held ahead and calls in flight
        killed = time.monotonic()
        for f in futures:
            f.result()
    assert used > 0 and outcomes.count("ok") > 10
    assert sim.stats()["models"][HAIKU]["peak_concurrency"] <= cap
    client = redis.Redis.from_url(redis_server.url)
    keys = plan(pool).keys
    while client.zcard(keys.pool_leases):
        assert time.monotonic() - killed < ttl + 1 + 3.0, "slots held past TTL + grant time"
        time.sleep(0.05)
