"""The fleet view (`GET /sluice/v1/fleet`) and `sluice status`: fleet-wide numbers from Redis.

Three real instances under load; whichever one is asked, the numbers are the fleet's.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from tests.support.fleet_ops import (
    Traffic,
    load,
    rate_policy,
    sluice_cli,
    wait_version,
    write_policy,
)
from tests.support.processes import Simulator, Sluice, http_json
from tests.support.redis_fixtures import RedisServerProcess


class Fleet:
    def __init__(self, name: str, pool: str, redis_url: str, instances: list[Sluice]) -> None:
        self.name, self.pool, self.redis_url, self.instances = name, pool, redis_url, instances

    def view(self, i: int = 0) -> dict[str, Any]:
        return http_json("GET", self.instances[i].url + "/sluice/v1/fleet")  # type: ignore[no-any-return]

    def cli(self, *args: str) -> Any:
        return sluice_cli(*args, "--redis-url", self.redis_url, "--fleet", self.name)


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
    simulator: Simulator,
    redis_server: RedisServerProcess,
) -> Iterator[Fleet]:
    name, pool = f"dash-{uuid.uuid4().hex[:8]}", f"d{uuid.uuid4().hex[:8]}"
    directory = tmp_path_factory.mktemp("dash")
    policy = rate_policy(pool, 60000, 1000)
    policy["models"][pool]["requests_per_minute"] = 30000
    first = write_policy(directory, policy)
    instances = [
        Sluice(
            directory,
            upstream=simulator.url,
            policy=str(first),
            redis_url=redis_server.url,
            extra_args=["--fleet", name],
        )
        for _ in range(3)
    ]
    yield Fleet(name, pool, redis_server.url, instances)
    for p in instances:
        p.stop()


def pool_row(view: dict[str, Any], pool: str) -> dict[str, Any]:
    return next(p for p in view["pools"] if p["name"] == pool)


@pytest.mark.slow
@pytest.mark.long
async def test_fleet_view_sums_every_instance_from_redis(fleet: Fleet) -> None:
    traffic = Traffic()
    driver = asyncio.create_task(load(fleet.instances, traffic))
    await asyncio.sleep(12)  # one full 10 s window of load
    views = [await asyncio.to_thread(fleet.view, i) for i in range(3)]
    since = time.time() - 10
    traffic.stop.set()
    await driver
    sent = sum(1 for _, t, s, _ in traffic.records if t >= since and s == 200)
    for view in views:
        assert len(view["instances"]) == 3
        row = pool_row(view, fleet.pool)
        # Whichever instance answers, the rate is the fleet's (±35%: windows are not aligned).
        assert row["requests_per_min"] == pytest.approx(sent * 6, rel=0.35), (row, sent)
        assert row["quota"]["rpm"] == 30000
        w = next(w for w in view["workloads"] if w["name"] == "w")
        assert w["admitted_per_s"] == pytest.approx(sent / 10, rel=0.35)
        assert w["p50_ms"] is not None and w["p99_ms"] >= w["p50_ms"]
        default = next(c for c in view["classes"] if c["name"] == "default")
        assert default["admitted_per_s"] == pytest.approx(w["admitted_per_s"], rel=0.01)


def test_fleet_view_and_status_show_a_new_limit(fleet: Fleet, tmp_path: Path) -> None:
    policy = rate_policy(fleet.pool, 60000, 1000)
    policy["models"][fleet.pool]["requests_per_minute"] = 12345
    out = fleet.cli("policy", "apply", str(write_policy(tmp_path, policy)))
    assert out.returncode == 0, out.stderr
    version = wait_version(fleet.instances, int(out.stdout.split("policy v")[1].split()[0]))[0]
    deadline = time.monotonic() + 5
    while pool_row(fleet.view(2), fleet.pool)["quota"]["rpm"] != 12345:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    status = fleet.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert pool_row(doc, fleet.pool)["quota"]["rpm"] == 12345
    assert doc["policy"]["version"] == version["version"]
    table = fleet.cli("status")
    assert table.returncode == 0, table.stderr
    assert fleet.pool in table.stdout and "12,345" in table.stdout
    assert f"policy v{version['version']}" in table.stdout


def test_merge_sums_rates_takes_the_worst_breaker_and_merges_histograms() -> None:
    from proxy.control.fleet import N_BUCKETS, bucket_index

    def snap(i: int, requests: float, latency_ms: float, breaker: int) -> dict[str, Any]:
        hist = [0] * N_BUCKETS
        hist[bucket_index(latency_ms)] = 100
        return {
            "id": f"i{i}", "at": 1000.0, "window_s": 10.0, "policy": {"version": 3},
            "pools": {"haiku": {"requests": requests, "upstream": requests, "throttled": 5,
                                "in_flight": 4, "limit": 20, "breaker": breaker,
                                "quota": {"rpm": 600}}},
            "classes": {"P0": {"admitted": requests, "hist": hist, "share": 1.0}},
            "workloads": {"chat": {"admitted": requests, "degraded": 1, "class": "P0",
                                   "hist": hist}},
            "paused": ["chat"] if i else [], "schedules": {}, "batch": {}, "dlq": {},
        }  # fmt: skip

    from proxy.ops.fleetview import merge

    merged = merge([snap(0, 100, 10, 0), snap(1, 50, 1000, 2)], "f", now=1001.0)
    view = json.loads(json.dumps(merged.as_json()))  # what /sluice/v1/fleet sends
    pool = view["pools"][0]
    assert pool["requests_per_min"] == 900.0  # (100 + 50) / 10 s x 60
    assert pool["in_flight"] == 8 and pool["limit"] == 20 and pool["breaker"] == "open"
    assert pool["throttle_rate"] == round(10 / 150, 4)
    p0 = view["classes"][0]
    assert p0["admitted_per_s"] == 15.0 and p0["degraded_per_s"] == 0.2
    assert p0["p50_ms"] < 15 and 700 < p0["p99_ms"] < 1100  # half took 1 s (1.25x buckets)
    assert view["paused"] == ["chat"] and view["workloads"][0]["paused"]
    assert [i["age_s"] for i in view["instances"]] == [1.0, 1.0]


def test_snapshot_counts_only_its_window() -> None:
    from proxy.config import parse_policy
    from proxy.metrics import Metrics
    from proxy.ops.snapshot import Snapshots
    from proxy.policy import CompiledPolicy

    metrics = Metrics()
    policy = CompiledPolicy(parse_policy({"workloads": {"w": {}}}))
    snapshots = Snapshots(metrics.registry, lambda: policy, dict, "i", window_s=2, tick_s=1)
    metrics.admitted_of("w", "haiku", "default").inc(7)
    snapshots.tap("w", "default", 0.02)
    first = snapshots.tick()
    assert first["workloads"]["w"]["admitted"] == 7
    assert sum(first["workloads"]["w"]["hist"]) == 1
    metrics.admitted_of("w", "haiku", "default").inc(3)
    assert snapshots.tick()["workloads"]["w"]["admitted"] == 10  # both ticks in the window
    third = snapshots.tick()
    assert third["workloads"]["w"]["admitted"] == 3  # the first tick left the window
    assert sum(third["workloads"]["w"]["hist"]) == 0
    assert third["classes"]["default"]["share"] == 1.0


def test_snapshot_reads_the_registry_as_collect_would() -> None:
    # read_registry reads metric children directly (not collect()); every number it keeps
    # must be what collect() reports, function gauges and histogram counts included.
    from prometheus_client import Gauge

    from proxy.metrics import Metrics
    from proxy.ops import snapshot

    metrics = Metrics()
    metrics.requests_of("InvokeModel", "haiku", "w", "200", "-").inc(5)
    metrics.requests_of("Converse", "-", "-", "404", "-").inc()
    metrics.tokens_of("w", "haiku", "input").inc(40)
    for seconds in (0.003, 0.2, 70.0):
        metrics.latency_of("haiku", "InvokeModel").observe(seconds)
    metrics.admitted_of("w", "haiku", "P0").inc(3)
    metrics.in_flight_of("haiku").inc(2)
    metrics.pool_limit.labels("haiku").set_function(lambda: 12.0)
    metrics.upstream_errors.labels("haiku", "ThrottlingException").inc(4)
    metrics.upstream_errors.labels("haiku", "ModelTimeoutException").inc()
    Gauge("sluice_dlq_records", "unlabelled", registry=metrics.registry).set(9)

    def collected(registry: Any) -> Any:  # read_registry's loop over collect()'s samples
        return [s for family in registry.collect() for s in family.samples]

    totals, gauges = snapshot.read_registry(metrics.registry)
    reference = mock.patch.object(snapshot, "_collectors", lambda r: [r])
    with reference, mock.patch.object(snapshot, "_samples", collected):
        want_totals, want_gauges = snapshot.read_registry(metrics.registry)
    assert totals == want_totals and totals["pool", "haiku"]["upstream"] == 3
    assert totals["pool", "haiku"]["throttled"] == 4
    assert [g[:3] for g in gauges] == [g[:3] for g in want_gauges]
    assert {g.name for g in gauges} == {"sluice_in_flight", "sluice_pool_concurrency_limit",
                                        "sluice_dlq_records"}  # fmt: skip


def test_request_path_metric_updates_equal_prometheus_own() -> None:
    # Children.inc / observe skip prometheus_client's per-call wrappers: same exposition.
    from prometheus_client import generate_latest

    from proxy.metrics import Metrics

    ours, theirs = Metrics(), Metrics()
    for n, seconds in ((3, 0.004), (0, 0.1), (7, 0.1), (2, 75.0), (1, float("nan"))):
        ours.tokens_of.inc(("w", "haiku", "input"), n)
        theirs.tokens_of("w", "haiku", "input").inc(n)
        ours.requests_of.inc(("InvokeModel", "haiku", "w", "200", "-"))
        theirs.requests_of("InvokeModel", "haiku", "w", "200", "-").inc()
        ours.latency_of.observe(("haiku", "InvokeModel"), seconds)
        theirs.latency_of("haiku", "InvokeModel").observe(seconds)
    with pytest.raises(ValueError, match="non-negative"):
        ours.tokens_of.inc(("w", "haiku", "input"), -1)

    def exposition(m: Metrics) -> list[str]:
        text = generate_latest(m.registry).decode()
        return [line for line in text.splitlines() if "_created" not in line]

    assert exposition(ours) == exposition(theirs)


def test_status_watch_redraws_until_interrupted(fleet: Fleet) -> None:
    import signal
    import subprocess
    import sys

    from tests.support.processes import ROOT

    deadline = time.monotonic() + 10
    while len(fleet.view()["instances"]) < 3:  # each instance reports within a second of start
        assert time.monotonic() < deadline
        time.sleep(0.2)
    cmd = [sys.executable, "-m", "proxy", "status", "--redis-url", fleet.redis_url,
           "--fleet", fleet.name, "--watch", "--interval", "0.3"]  # fmt: skip
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert proc.stdout is not None
    seen, deadline = [], time.monotonic() + 30
    while sum("\x1b[H\x1b[2J" in line for line in seen) < 3:  # redrawn in place, repeatedly
        assert time.monotonic() < deadline, seen
        seen.append(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=10)
    assert proc.returncode == 0  # Ctrl-C ends --watch quietly
    assert "".join(seen).count(f"fleet {fleet.name}: 3 instances") >= 2, seen


def test_single_instance_dashboard_needs_no_redis_and_no_cdn(
    sim: Simulator, make_sluice: Any
) -> None:
    import re
    import urllib.request

    from tests.support.fleet_ops import call

    proxy = make_sluice(upstream=sim.url, policy=rate_policy("haiku", 6000, 100))

    async def traffic() -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            for _ in range(10):
                assert (await call(session, proxy.url))[0] == 200

    asyncio.run(traffic())
    deadline = time.monotonic() + 5
    while True:
        view = http_json("GET", proxy.url + "/sluice/v1/fleet")
        rows = [w for w in view["workloads"] if w["name"] == "w"]
        if rows and rows[0]["admitted_per_s"] > 0:
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.2)
    assert len(view["instances"]) == 1 and view["fleet"] == "default"
    for path in ("/dashboard", "/dashboard/dashboard.js", "/dashboard/dashboard.css"):
        with urllib.request.urlopen(proxy.url + path, timeout=5) as resp:
            assert resp.status == 200
            body = resp.read().decode()
        # Everything ships in the package: no external URL is ever fetched.
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", body), path
        assert "import(" not in body and "cdn" not in body.lower(), path
