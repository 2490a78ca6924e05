"""Single-instance hot reload: the --config file is watched, and SIGHUP re-reads it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import yaml

from tests.support.fleet_ops import call, policy_of, rate_policy
from tests.support.processes import Simulator, Sluice, metric_value


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


async def statuses(proxy: Sluice, workload: str, n: int) -> list[int]:
    async with aiohttp.ClientSession() as session:
        return [(await call(session, proxy.url, workload))[0] for _ in range(n)]


def test_file_change_and_sighup_switch_a_single_instance(
    tmp_path: Path, sim: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(rate_policy("haiku", 60000, 1000, gone={})))
    proxy = make_sluice(upstream=sim.url, policy=str(path))
    assert policy_of(proxy)["version"] == 1
    assert asyncio.run(statuses(proxy, "gone", 2)) == [200, 200]

    # Edited in place: lowered limit, one workload removed.
    path.write_text(yaml.safe_dump(rate_policy("haiku", 60, 1)))
    wait_for(lambda: policy_of(proxy)["version"] == 2)
    assert "policy v1 -> v2 (sha" in proxy.stderr()
    assert asyncio.run(statuses(proxy, "gone", 1)) != [200]
    assert asyncio.run(statuses(proxy, "w", 3)).count(429) >= 2

    # Same size, mtime put back: the watch cannot see it, SIGHUP makes it look.
    before = path.stat()
    path.write_text(path.read_text().replace("requests_per_minute: 60", "requests_per_minute: 70"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    time.sleep(1.5)
    assert policy_of(proxy)["version"] == 2
    os.kill(proxy.pid, signal.SIGHUP)
    wait_for(lambda: policy_of(proxy)["version"] == 3)

    # An invalid edit is refused, counted, and the instance keeps v3.
    path.write_text("models: {haiku: {concurrency: -1}}\n")
    wait_for(lambda: metric_value(proxy.metrics(), "sluice_policy_errors_total") == 1)
    assert policy_of(proxy)["version"] == 3
    assert "greater than 0" in proxy.stderr()
    assert metric_value(proxy.metrics(), "sluice_policy_version") == 3
