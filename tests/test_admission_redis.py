"""What only a real Redis can show: several OS processes, kill -9, faults, round trips.

Figures (round trips per request, latency, throughput) are printed and attached to the
test report with ``record_property``; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.admission import StoreUnavailable
from proxy.backend.store import RedisStore
from proxy.metrics import Metrics
from tests.support.admission_helpers import eventually, new_pool, per_min, plan
from tests.support.redis_fixtures import RedisClusterProcesses, RedisServerProcess

ROOT = Path(__file__).resolve().parent.parent
Factory = Callable[..., RedisServerProcess]

# A separate Sluice-like process: its own event loop and RedisStore on the same Redis.
WORKER = r"""
import asyncio, json, sys, time
from proxy.backend.store import RedisStore
from tests.support.admission_helpers import plan, per_min

async def main(mode, url, pool, arg):
    store = RedisStore(url)
    await store.start()
    if mode == "burst":
        p = plan(pool, pool_requests=per_min(1, 50))
        while time.time() < arg:
            await asyncio.sleep(0.001)
        ds = await asyncio.gather(*(store.admit(p, 0) for _ in range(60)))
        print(json.dumps(sum(d.admitted for d in ds)), flush=True)
    elif mode == "hold":
        p = plan(pool, pool_concurrency=3, lease_ttl_ms=int(arg))
        ds = [await store.admit(p, 0) for _ in range(3)]
        print(json.dumps(sum(d.admitted for d in ds)), flush=True)
        await asyncio.sleep(3600)
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
"""


def spawn(mode: str, url: str, pool: str, arg: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, mode, url, pool, str(arg)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


# --- several processes -----------------------------------------------------------------


@pytest.mark.slow
def test_four_processes_on_one_hot_key_admit_exactly_the_burst(
    redis_server: RedisServerProcess,
) -> None:
    pool = new_pool()
    start_at = time.time() + 1.5  # all four fire together, after their imports
    workers = [spawn("burst", redis_server.url, pool, start_at) for _ in range(4)]
    counts = [json.loads(w.communicate(timeout=30)[0]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    assert sum(counts) == 50, counts  # 240 tries, burst 50, refill 1/min


@pytest.mark.slow
async def test_slots_of_a_killed_process_come_back_within_the_lease_ttl(
    redis_server: RedisServerProcess,
) -> None:
    pool, ttl_ms = new_pool(), 1200
    p = plan(pool, pool_concurrency=3, lease_ttl_ms=ttl_ms)
    holder = spawn("hold", redis_server.url, pool, ttl_ms)
    store = RedisStore(redis_server.url)
    await store.start()
    try:
        line = await asyncio.to_thread(holder.stdout.readline)  # type: ignore[union-attr]
        assert json.loads(line) == 3
        await asyncio.sleep(ttl_ms / 1000 * 1.5)  # the holder's heartbeat keeps them
        assert (await store.admit(p, 0)).refused_by == "pool.concurrency"
        holder.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        for _ in range(400):  # polls for up to ~10 s
            d = await store.admit(p, 0)
            if d.admitted:
                break
            await asyncio.sleep(0.025)
        back_after = time.monotonic() - killed
        assert d.lease is not None
        assert back_after <= ttl_ms / 1000 + 0.3, back_after
        print(f"\nslot back {back_after * 1000:.0f} ms after SIGKILL (ttl {ttl_ms} ms)")
    finally:
        holder.kill()
        holder.wait()
        await store.close()


# --- round trips ---------------------------------------------------------------------------


async def test_at_most_one_script_call_per_request(
    redis_factory: Factory, record_property: Callable[[str, object], None]
) -> None:
    server = redis_factory()
    client = redis.Redis(port=server.port)
    store = RedisStore(server.url)
    await store.start()
    p = plan(
        new_pool(),
        pool_requests=per_min(1e6, 1e5),
        pool_tokens=per_min(1e9, 1e8),
        pool_concurrency=10_000,
        workload_concurrency=10_000,
    )
    try:
        client.config_resetstat()
        ds = await asyncio.gather(*(store.admit(p, 100) for _ in range(500)))
        admit_calls = evalsha_calls(client)
        client.config_resetstat()
        for d in ds:
            assert d.lease is not None
            store.settle(p, d.lease, 100, 40)
        await store.flush()
        settle_calls = evalsha_calls(client)

        # steady concurrent load: 64 clients, admit -> tiny work -> settle
        client.config_resetstat()
        done = 0

        async def one_client() -> None:
            nonlocal done
            for _ in range(20):
                d = await store.admit(p, 100)
                assert d.lease is not None
                await asyncio.sleep(0)
                store.settle(p, d.lease, 100, 50)
                done += 1

        await asyncio.gather(*(one_client() for _ in range(64)))
        await store.flush()
        mixed_calls = evalsha_calls(client)
    finally:
        await store.close()
        client.close()
    ratios = {
        "admit_evalsha_per_request": admit_calls / 500,
        "settle_evalsha_per_request": settle_calls / 500,
        "mixed_evalsha_per_request": mixed_calls / done,
    }
    print("\n" + json.dumps(ratios))
    for name, value in ratios.items():
        record_property(name, value)
    assert admit_calls <= 500 and settle_calls <= 500
    assert mixed_calls <= 2 * done
    assert ratios["admit_evalsha_per_request"] < 0.1  # 500 same-tick admits: a few batches


# --- faults --------------------------------------------------------------------------------


async def test_script_flush_mid_run_is_recovered(redis_factory: Factory) -> None:
    server = redis_factory()
    store = RedisStore(server.url)
    await store.start()
    p = plan(new_pool(), pool_concurrency=100)
    try:
        assert (await store.admit(p, 0)).admitted
        server.cli("script", "flush")
        d = await store.admit(p, 0)
        assert d.admitted and d.lease is not None
        server.cli("script", "flush")
        store.settle(p, d.lease, 0, 0)
        await store.flush()
        assert store.settle_failures == 0
        assert (await store.pool_stats(p.pool))["in_flight"] == 1
    finally:
        await store.close()


@pytest.mark.parametrize("workload_counted", [False, True])
async def test_the_heartbeat_keeps_thousands_of_leases_of_one_pool(
    redis_server: RedisServerProcess, workload_counted: bool
) -> None:
    """4,500 calls in flight on one instance and pool (held streams): one heartbeat call for
    all of them exceeded Lua's unpack and every one of them expired after one TTL."""
    metrics = Metrics()
    store = RedisStore(redis_server.url, timeout_s=2.0, metrics=metrics)
    await store.start()
    limits = {"workload_concurrency": 100_000} if workload_counted else {}
    p = plan(new_pool(), pool_concurrency=100_000, lease_ttl_ms=1500, **limits)
    client = redis.Redis.from_url(redis_server.url)
    try:
        ds = await asyncio.gather(*(store.admit(p, 0) for _ in range(4500)))
        assert all(d.admitted for d in ds)
        await asyncio.sleep(3.2)  # > 2 TTLs: only the heartbeat keeps them
        assert client.zcard(p.keys.pool_leases) == 4500
        if workload_counted:
            assert client.zcard(p.keys.workload_leases) == 4500
        assert (await store.pool_stats(p.pool))["in_flight"] == 4500
        errors = metrics.store_errors.labels(operation="heartbeat")._value.get()
        assert errors == 0
        for d in ds:
            assert d.lease is not None
            store.settle(p, d.lease, 0, 0)
        await store.flush()
        assert client.zcard(p.keys.pool_leases) == 0
    finally:
        client.close()
        await store.close()


async def test_restarted_redis_is_used_again(redis_factory: Factory) -> None:
    server = redis_factory()
    store = RedisStore(server.url)
    await store.start()
    p = plan(new_pool(), pool_concurrency=100)
    try:
        assert (await store.admit(p, 0)).admitted
        server.restart()  # empty, no scripts, pooled connections dead
        assert (await store.admit(p, 0)).admitted
    finally:
        await store.close()


async def test_calls_in_flight_are_counted_again_after_redis_lost_its_data(
    redis_factory: Factory,
) -> None:
    """Redis restarts empty (no persistence) while calls run: the next heartbeat adds their
    leases back, so the fleet's concurrency limit still counts them (before, the heartbeat's
    ZADD XX extended nothing and a second instance was granted the busy slot, until the
    call ended: minutes for a stream). A lease reaped while Redis kept its data is not."""
    server = redis_factory()
    metrics = Metrics()
    holder = RedisStore(server.url, metrics=metrics)  # the instance whose calls are running
    other = RedisStore(server.url)
    await holder.start()
    await other.start()
    # A TTL of 3 s: the restart below blocks the loop, and the heartbeat after it must still
    # be within a TTL of the one before (heartbeats every TTL / 3).
    p = plan(new_pool(), pool_concurrency=2, workload_concurrency=2, lease_ttl_ms=3000)
    try:
        running = [await holder.admit(p, 0) for _ in range(2)]
        assert all(d.admitted for d in running)
        await eventually(lambda: p.pool in holder._epochs, timeout_s=5)  # a heartbeat ran
        server.restart()  # empty: no leases, no scripts
        inspect = redis.Redis.from_url(server.url)
        try:

            def restored() -> bool:
                return int(inspect.zcard(p.keys.pool_leases)) == 2 and (
                    int(inspect.zcard(p.keys.workload_leases)) == 2
                )

            await eventually(restored, timeout_s=10)  # a heartbeat is every TTL / 3
        finally:
            inspect.close()
        restored = metrics.registry.get_sample_value(
            "sluice_store_leases_restored_total", {"pool": p.pool}
        )
        assert restored == 2.0  # the pool's two leases (each also in its workload's set)
        refused = await other.admit(p, 0)
        busy = ("pool.concurrency", "workload.concurrency")
        assert not refused.admitted and refused.refused_by in busy, refused
        for d in running:
            assert d.lease is not None
            holder.settle(p, d.lease, 0, 0)
        await holder.flush()
        assert (await other.admit(p, 0)).admitted  # and given back when they end
    finally:
        await other.close()
        await holder.close()


async def test_an_instance_back_from_a_stall_never_restores_a_reaped_lease(
    redis_factory: Factory,
) -> None:
    """The epoch an instance saw counts only while its heartbeat is younger than its leases'
    TTL. Here it saw one, held nothing for a while, and Redis lost its data meanwhile (a
    new epoch since): its next lease, reaped while it stalled and its slot given away, must
    stay out, however stale the epoch it remembers."""
    server = redis_factory()
    metrics = Metrics()
    holder = RedisStore(server.url, metrics=metrics)
    other = RedisStore(server.url)
    await holder.start()
    await other.start()
    p = plan(new_pool(), pool_concurrency=1, lease_ttl_ms=1500)
    inspect = redis.Redis.from_url(server.url)
    try:
        first = await holder.admit(p, 0)
        assert first.lease is not None
        await eventually(lambda: p.pool in holder._epochs, timeout_s=5)
        holder.settle(p, first.lease, 0, 0)
        await holder.flush()
        inspect.flushall()  # data lost while the holder holds nothing there
        held = await other.admit(p, 0)  # another instance's heartbeat makes a new epoch
        assert held.lease is not None
        await eventually(lambda: p.pool in other._epochs, timeout_s=5)
        other.settle(p, held.lease, 0, 0)
        await other.flush()
        await asyncio.sleep(1.6)  # longer than the TTL: the holder's epoch is stale
        mine = await holder.admit(p, 0)
        assert mine.lease is not None
        inspect.zrem(p.keys.pool_leases, mine.lease)  # reaped while the holder stalled
        taken = await other.admit(p, 0)  # and its slot given away
        assert taken.admitted
        await asyncio.sleep(1.0)  # the holder's heartbeats (every TTL / 3) run
        assert int(inspect.zcard(p.keys.pool_leases)) == 1  # the other's only
        assert (
            metrics.registry.get_sample_value(
                "sluice_store_leases_restored_total", {"pool": p.pool}
            )
            is None
        )
    finally:
        inspect.close()
        await other.close()
        await holder.close()


async def test_data_lost_between_two_calls_of_one_heartbeat_restores_every_lease(
    redis_server: RedisServerProcess,
) -> None:
    """1,500 leases: a heartbeat of two calls (1,000 + 500). Redis loses the scope's data
    right after the first call: the second call sees the new epoch and adds its 500 back;
    the first call's 1,000 come back at the next heartbeat (the stamp did not move to an
    epoch only part of the leases were renewed under)."""
    metrics = Metrics()
    store = RedisStore(redis_server.url, metrics=metrics, timeout_s=2.0)
    await store.start()
    p = plan(new_pool(), pool_concurrency=100_000, lease_ttl_ms=3000)
    r = redis.Redis.from_url(redis_server.url)
    try:
        running = await asyncio.gather(*(store.admit(p, 0) for _ in range(1500)))
        assert all(d.admitted for d in running)
        await eventually(lambda: p.pool in store._epochs, timeout_s=5)
        run, armed = store._runner.run, [True]

        async def losing_after_the_first_call(name: str, keys: Any, args: Any) -> Any:
            res = await run(name, keys, args)
            if armed[0] and name == "extend" and len(args) - 2 - 3 * int(args[0]) == 1000:
                armed[0] = False
                r.delete(p.keys.pool, p.keys.pool_leases, p.keys.workload_leases)
            return res

        store._runner.run = losing_after_the_first_call  # type: ignore[method-assign]

        def all_back() -> bool:
            return int(r.zcard(p.keys.pool_leases)) == 1500

        await eventually(lambda: not armed[0], timeout_s=5)  # lost after a first call
        await eventually(all_back, timeout_s=10)

        def counted() -> bool:  # (the heartbeat counts once its calls are done)
            restored = metrics.registry.get_sample_value(
                "sluice_store_leases_restored_total", {"pool": p.pool}
            )
            return restored == 1500.0

        await eventually(counted, timeout_s=5)
    finally:
        r.close()
        await store.close()


def test_a_heartbeat_adds_leases_back_only_when_the_epoch_moved(
    redis_server: RedisServerProcess,
) -> None:
    """extend.lua: a lease reaped while Redis kept its data stays out (its slot may have been
    given away); one lost with the data (the epoch is gone, or not the one the instance saw
    at its last heartbeat) is added back, with its sets' TTLs. An instance that names no
    epoch (a new one, or one whose last heartbeat is older than its leases' TTL) only
    extends."""
    from proxy.backend.admit_wire import extend_calls
    from proxy.backend.lua import load_script

    r = redis.Redis.from_url(redis_server.url)
    sha = r.script_load(load_script("extend"))
    p = plan(new_pool(), pool_concurrency=5, workload_concurrency=5)

    def beat(seen: str) -> tuple[int, str]:
        """(leases added back, the epoch now)."""
        ((keys, args),) = extend_calls(p.pool, [(p, ["L1"])], seen)
        n, epoch, added_back = r.evalsha(sha, len(keys), *keys, *args)
        return int(n) if added_back else 0, epoch.decode()

    def held() -> int:
        return int(r.zcard(p.keys.pool_leases)) + int(r.zcard(p.keys.workload_leases))

    def granted() -> None:  # as admit.lua leaves a lease
        r.zadd(p.keys.pool_leases, {"L1": 1})
        r.zadd(p.keys.workload_leases, {"L1": 1})

    try:
        assert beat("") == (0, beat("")[1]) and held() == 0  # none known: nothing added
        first = beat("")[1]
        granted()
        assert beat("") == (0, first) and held() == 2  # extended, not added back
        assert beat(first) == (0, first) and held() == 2
        r.delete(p.keys.pool_leases, p.keys.workload_leases)  # reaped: the data kept
        assert beat(first) == (0, first) and held() == 0
        assert beat("") == (0, first) and held() == 0
        n, again = beat("an-epoch-of-before")  # Redis lost its data since this one's last
        assert (n, again, held()) == (1, first, 2)
        r.flushall()  # lost again: a new epoch, the lease back, its sets expiring
        n, second = beat(first)
        assert n == 1 and second != first and held() == 2
        assert r.pttl(p.keys.pool_leases) > 0 and r.pttl(p.keys.workload_leases) > 0
    finally:
        r.close()


async def test_dead_redis_fails_admit_within_the_timeout(
    redis_factory: Factory, record_property: Callable[[str, object], None]
) -> None:
    server = redis_factory()
    metrics = Metrics()
    store = RedisStore(server.url, metrics=metrics, timeout_s=0.25)
    await store.start()
    p = plan(new_pool(), pool_concurrency=100)
    try:
        assert (await store.admit(p, 0)).admitted
        # a hung server (SIGSTOP): only the timeout can end the wait
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.admit(p, 0)
        hung = time.monotonic() - started
        assert not await store.ping()
        server.proc.send_signal(signal.SIGCONT)
        server.kill()  # a dead server: refused connections
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.admit(p, 0)
        dead = time.monotonic() - started
    finally:
        await store.close()
    print(f"\nStoreUnavailable after {hung * 1000:.0f} ms (hung), {dead * 1000:.0f} ms (dead)")
    record_property("unavailable_hung_ms", hung * 1000)
    record_property("unavailable_dead_ms", dead * 1000)
    assert 0.2 <= hung <= 0.25 + 0.15
    assert dead <= 0.25 + 0.15
    errors = metrics.registry.get_sample_value("sluice_store_errors_total", {"operation": "admit"})
    assert errors == 2


async def test_failed_settles_are_counted_and_logged(
    redis_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_factory()
    metrics = Metrics()
    store = RedisStore(server.url, metrics=metrics)
    await store.start()
    p = plan(new_pool(), pool_concurrency=100)
    leases = [(await store.admit(p, 10)).lease for _ in range(5)]
    server.kill()
    with caplog.at_level(logging.ERROR, logger="proxy.admission"):
        for lease in leases:
            assert lease is not None
            store.settle(p, lease, 10, 5)
        await store.close()  # flushes: the failure must surface, not vanish
    assert store.settle_failures == 5
    count = metrics.registry.get_sample_value("sluice_store_errors_total", {"operation": "settle"})
    assert count == 5
    logged = [json.loads(r.getMessage()) for r in caplog.records]
    assert sum(e["settles"] for e in logged if e["operation"] == "settle") == 5


async def test_an_outage_logs_a_line_a_second_per_operation_not_one_per_failed_batch(
    redis_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """A failover failed every admit batch with a WARNING of its own (~4,500 lines in 9 s):
    now the first failure is logged at once and those in the next second are summed into
    one line; every failure is still counted, in the metric and in the lines' counts."""
    server = redis_factory()
    metrics = Metrics()
    store = RedisStore(server.url, metrics=metrics, timeout_s=0.1)
    await store.start()
    p = plan(new_pool(), pool_concurrency=100)
    assert (await store.admit(p, 0)).admitted
    server.kill()
    failed = 0
    with caplog.at_level(logging.WARNING, logger="proxy.admission"):
        for _ in range(40):  # one batch each, well within a second
            with pytest.raises(StoreUnavailable):
                await store.admit(p, 0)
            failed += 1
        at_once = [r for r in caplog.records if "store_error" in r.getMessage()]
        await asyncio.sleep(1.2)  # the second ends: its failures in one line
        await store.close()
    logged = [json.loads(r.getMessage()) for r in caplog.records]
    lines = [e for e in logged if e.get("event") == "store_error" and e["operation"] == "admit"]
    assert len(at_once) == 1
    assert len(lines) == 2, lines
    assert lines[1]["batches"] == failed - 1
    assert sum(e["requests"] for e in lines) == failed
    count = metrics.registry.get_sample_value("sluice_store_errors_total", {"operation": "admit"})
    assert count == failed


def test_scripts_take_time_only_from_redis() -> None:
    scripts = resources.files("proxy.admission") / "scripts"
    for script in scripts.iterdir():
        if not script.name.endswith(".lua"):
            continue
        text = script.read_text()
        assert "redis.call('TIME')" in text, script.name
        for line in text.splitlines():
            if re.match(r"\s*local (now|sec)\b", line):
                assert re.search(r"\bt\[[12]\]|\bsec\b", line), (script.name, line)
                assert "ARGV" not in line, (script.name, line)
    # and the Python side has no clock of its own to skew
    import proxy.backend.redis_store as mod

    assert "time" not in vars(mod)


# --- cluster -------------------------------------------------------------------------------


def _node_of(cluster: RedisClusterProcesses, pool: str) -> int:
    slot = redis.cluster.key_slot(f"sluice:{{{pool}}}:pool".encode())
    ranges = json.loads(
        json.dumps(
            redis.Redis(port=cluster.nodes[0].port).execute_command("CLUSTER SLOTS"), default=str
        )
    )
    for lo, hi, master, *_ in ranges:
        if int(lo) <= slot <= int(hi):
            return int(master[1])
    raise AssertionError(slot)


@pytest.mark.cluster
async def test_pools_spread_over_masters_and_one_decision_stays_on_one(
    redis_cluster: RedisClusterProcesses,
) -> None:
    by_port: dict[int, str] = {}
    while len(by_port) < 3:
        pool = new_pool()
        by_port.setdefault(_node_of(redis_cluster, pool), pool)
    store = RedisStore(redis_cluster.url)
    await store.start()
    try:
        for pool in by_port.values():
            p = plan(
                pool,
                pool_requests=per_min(60, 5),
                pool_tokens=per_min(600, 1000),
                pool_concurrency=5,
                workload_concurrency=5,
                workload_tokens=per_min(600, 900),
            )
            d = await store.admit(p, 10)
            assert d.admitted and d.lease is not None
            store.settle(p, d.lease, 10, 5)
        await store.flush()
    finally:
        await store.close()
    for port, pool in by_port.items():
        keys = redis.Redis(port=port).keys(f"sluice:{{{pool}}}:*")
        assert keys, pool  # every key of this pool lives on the master that owns its slot
        others = [q for q in by_port.values() if q != pool]
        for other in others:
            assert not redis.Redis(port=port).keys(f"sluice:{{{other}}}:*")


# --- figures -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_admission_latency_and_throughput(
    redis_factory: Factory, record_property: Callable[[str, object], None]
) -> None:
    server = redis_factory()
    store = RedisStore(server.url)
    await store.start()
    p = plan(
        new_pool(),
        share=0.85,
        pool_requests=per_min(1e9, 1e8),
        pool_tokens=per_min(1e12, 1e11),
        pool_concurrency=100_000,
        workload_requests=per_min(1e9, 1e8),
        workload_tokens=per_min(1e12, 1e11),
        workload_concurrency=100_000,
    )
    figures: dict[str, float] = {}
    try:
        lat: list[float] = []
        for _ in range(1000):
            t = time.perf_counter()
            d = await store.admit(p, 100)
            lat.append(time.perf_counter() - t)
            assert d.lease is not None
            store.settle(p, d.lease, 100, 50)
            await store.flush()
        lat.sort()
        figures["single_p50_us"] = lat[len(lat) // 2] * 1e6
        figures["single_p99_us"] = lat[int(len(lat) * 0.99)] * 1e6
        lat = []
        count = 0
        stop = time.perf_counter() + 2.0

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < stop:
                t = time.perf_counter()
                d = await store.admit(p, 100)
                lat.append(time.perf_counter() - t)
                assert d.lease is not None
                store.settle(p, d.lease, 100, 50)
                count += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(64)))
        figures["batched64_admits_per_s"] = count / (time.perf_counter() - began)
        await store.flush()
        lat.sort()
        figures["batched64_p50_us"] = lat[len(lat) // 2] * 1e6
        figures["batched64_p99_us"] = lat[int(len(lat) * 0.99)] * 1e6
    finally:
        await store.close()
    print("\n" + json.dumps({k: round(v) for k, v in figures.items()}))
    for name, value in figures.items():
        record_property(name, value)
    assert figures["single_p50_us"] < 5000
    assert figures["batched64_admits_per_s"] > 1000


def test_heartbeat_calls_are_bounded_and_carry_every_lease() -> None:
    from proxy.backend.admit_wire import extend_calls

    a, b = plan(new_pool()), plan("x", workload="other", workload_concurrency=3)
    groups = [(a, [f"a{i}" for i in range(2500)]), (b, [f"b{i}" for i in range(700)])]
    calls = extend_calls(a.pool, groups, "e1", most=1000)
    seen: list[str] = []
    for keys, args in calls:
        g, j, n = int(args[0]), 2, 0
        assert len(keys) == 2 + g and args[1] == "e1"
        for _ in range(g):
            c = int(args[j + 2])
            seen += [str(x) for x in args[j + 3 : j + 3 + c]]
            n += c
            j += 3 + c
        assert j == len(args) and 0 < n <= 1000
    assert seen == [f"a{i}" for i in range(2500)] + [f"b{i}" for i in range(700)]
    assert len(calls) == 4
