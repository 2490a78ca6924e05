"""Every instance of a fleet learns the same quota from Bedrock's throttles (issue 9).

Three Sluice processes share one Redis and one fleet; Bedrock (the simulator) grants 4
concurrent Sonnet calls while the pool starts at a limit of 16. Whichever instance leads
the interval that cuts, all of them must then know where Bedrock throttled: an instance
that did not (it saw the cut only after its own window had moved past the throttle) leads
a later interval by probing above the quota, the sawtooth of throttles the issue saw long
after a quota cut.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.support.load import Results, adaptive_fleet, drive
from tests.support.processes import metric_value

SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
QUOTA = 4


@pytest.mark.long
async def test_every_instance_learns_the_quota_the_fleet_was_throttled_at(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator(
        {"latency_scale": 0.5, "models": {SONNET: {"quotas": {"concurrency": QUOTA}}}}
    )
    pool = f"sonnet{uuid.uuid4().hex[:8]}"
    adaptive = {"initial": 16, "ceiling": 16, "interval_seconds": 0.5, "target_p99_ms": 10000}
    proxies = adaptive_fleet(make_sluice, sim.url, redis_server.url, pool, SONNET, adaptive)
    await drive([p.url for p in proxies], "chat", SONNET, clients=16, seconds=5, results=Results())
    await asyncio.sleep(1.0)  # a few ticks: every instance has read the last fleet buckets
    name = "sluice_adaptive_learned_quota"
    learned = [metric_value(p.metrics(), name, pool=pool) for p in proxies]
    assert sim.stats()["models"][SONNET]["throttled"] > 0  # Bedrock did throttle the fleet
    assert len(set(learned)) == 1, learned
    # Near the quota: in flight is sampled once a tick, so it can read a call low (or high).
    assert QUOTA - 1 <= learned[0] <= 2 * QUOTA, learned
