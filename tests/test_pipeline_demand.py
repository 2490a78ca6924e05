"""The admit stage reports refused demand to the controller (issue 9, through a real Sluice).

A P2 class may take 25 % of the pool: at a limit of 4 it holds 1 slot, so the pool's
in-flight never nears the limit. Only the refusals the admit stage hands to
``Adaptivity.refused`` show the controller that more is wanted; without them the limit
stays at 4 for good (the issue's incident 3).
"""

from __future__ import annotations

import uuid
from typing import Any

from tests.support.load import Results, drive
from tests.support.processes import metric_value

SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"


async def test_class_share_refusals_through_sluice_grow_the_pool(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    # Calls last about a second, so the refused callers (back after Retry-After) want
    # many more slots than the 1 their class holds.
    sim = make_simulator(
        {"latency_scale": 1.0, "models": {SONNET: {"quotas": {"concurrency": 80}}}}
    )
    pool = f"sonnet{uuid.uuid4().hex[:8]}"
    adaptive = {"initial": 4, "ceiling": 40, "interval_seconds": 0.25, "target_p99_ms": 5000}
    policy = {
        "identity": {"header_mode": True},
        "server": {"adaptivity": {"tick_seconds": 0.25}},
        "models": {pool: {"ids": [SONNET], "concurrency": 40, "adaptive": adaptive}},
        "priorities": {"P0": {"share": 1.0}, "P2": {"share": 0.25}},
        "workloads": {"browse": {"priority": "P2"}},
    }
    proxy = make_sluice(upstream=sim.url, policy=policy, redis_url=redis_server.url)
    results = Results()
    await drive([proxy.url], "browse", SONNET, clients=20, seconds=6, results=results)
    text = proxy.metrics()
    assert metric_value(text, "sluice_adaptive_limit", pool=pool) >= 8
    assert results.success_rate() > 0
