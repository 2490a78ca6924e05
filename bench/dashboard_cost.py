"""What the dashboard costs an instance: CPU per fleet-view poll, and at 200 req/s.

    PYTHONPATH=. .venv/bin/python bench/dashboard_cost.py

Starts Redis, the simulator and one Sluice in a fleet (real processes), then measures the
Sluice process's CPU time (/proc) for: (1) 300 back-to-back ``GET /sluice/v1/fleet``
polls, idle; (2) 20 s at 200 req/s without a dashboard, then 20 s with one polling every
2 s, three times each, alternating. Writes ``bench/results/dashboard_cost.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.fleet_ops import call, rate_policy, write_policy
from tests.support.processes import ROOT, Simulator, Sluice
from tests.support.redis_fixtures import RedisServerProcess

_TCK = os.sysconf("SC_CLK_TCK")
RATE, SECONDS, POLL_S = 200, 20.0, 2.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TCK


async def offered_load(url: str, seconds: float, poll: bool) -> int:
    """Open-loop RATE req/s for ``seconds`` (and a dashboard poller when ``poll``)."""
    ok = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            nonlocal ok
            ok += (await call(session, url))[0] == 200

        async def poller() -> None:
            while True:
                async with session.get(url + "/sluice/v1/fleet") as resp:
                    await resp.read()
                await asyncio.sleep(POLL_S)

        poll_task = asyncio.create_task(poller()) if poll else None
        start, tasks = time.monotonic(), []
        for i in range(int(RATE * seconds)):
            await asyncio.sleep(max(0.0, start + i / RATE - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        if poll_task is not None:
            poll_task.cancel()
    return ok


async def polls(url: str, n: int) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.get(url + "/sluice/v1/fleet") as resp:
                await resp.read()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="sluice-dash-bench-"))
    redis = RedisServerProcess().start()
    sim = Simulator(work, {"latency_scale": 0.02})
    policy = write_policy(work, rate_policy("haiku", 600000, 10000))
    proxy = Sluice(work, upstream=sim.url, policy=str(policy), redis_url=redis.url,
                   extra_args=["--fleet", "bench"])  # fmt: skip
    try:
        asyncio.run(offered_load(proxy.url, 3, poll=False))  # warm up
        before = cpu_seconds(proxy.pid)
        started = time.monotonic()
        asyncio.run(polls(proxy.url, 300))
        idle_poll_ms = (cpu_seconds(proxy.pid) - before) * 1000 / 300
        idle_wall = time.monotonic() - started
        runs: dict[str, list[float]] = {"without": [], "with": []}
        for _ in range(3):
            for label in ("without", "with"):
                before, t0 = cpu_seconds(proxy.pid), time.monotonic()
                asyncio.run(offered_load(proxy.url, SECONDS, poll=label == "with"))
                runs[label].append((cpu_seconds(proxy.pid) - before) / (time.monotonic() - t0))
    finally:
        proxy.stop()
        sim.stop()
        redis.cleanup()
    without, with_ = statistics.median(runs["without"]), statistics.median(runs["with"])
    result = {
        "cpu_ms_per_fleet_view_poll": round(idle_poll_ms, 3),
        "poll_wall_s_for_300": round(idle_wall, 2),
        "polling_share_of_one_core_at_1_per_2s_pct": round(idle_poll_ms / (POLL_S * 1000) * 100, 3),
        "rate_req_s": RATE,
        "cpu_core_share_without_dashboard": [round(v, 4) for v in runs["without"]],
        "cpu_core_share_with_dashboard": [round(v, 4) for v in runs["with"]],
        "median_without": round(without, 4),
        "median_with": round(with_, 4),
        # What one dashboard's polls add, as a share of the instance's own CPU at RATE: the
        # per-poll cost is measured directly; the whole-run A/B below is only as good as
        # the machine is quiet (repetitions spread by ~15% on a shared 2-core VM).
        "poll_share_of_instance_cpu_pct": round(idle_poll_ms / (POLL_S * 1000) / without * 100, 3),
        "added_cpu_pct_of_instance_ab": round((with_ - without) / without * 100, 2),
    }
    out = ROOT / "bench" / "results" / "dashboard_cost.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
