"""What the requeue tests share: Sonnet with one Bedrock slot, and the hold/orders policy.

Another workload (``hold``) takes Bedrock's only slot; ``orders`` (a class without a chain)
is throttled and must be queued again for a slot, as each test's numbers say.
"""

from __future__ import annotations

from typing import Any

from tests.support.processes import Simulator

SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"


def one_slot_sonnet(make_simulator: Any) -> Simulator:
    """A simulator whose Sonnet serves one call at a time (each takes about a second)."""
    sim: Simulator = make_simulator(
        {"latency_scale": 1.0, "models": {SONNET: {"quotas": {"concurrency": 1}}}}
    )
    return sim


def hold_and_orders(
    pool: str,
    concurrency: int,
    adaptive: dict[str, Any],
    retry: dict[str, Any],
    orders: dict[str, Any],
) -> dict[str, Any]:
    """Header-mode policy: one adaptive Sonnet pool, workloads ``hold`` and ``orders``."""
    return {
        "identity": {"header_mode": True},
        "server": {"adaptivity": {"tick_seconds": 0.25}, "retry": retry},
        "models": {pool: {"ids": [SONNET], "concurrency": concurrency, "adaptive": adaptive}},
        "workloads": {"hold": {"models": [pool]}, "orders": {"models": [pool], **orders}},
    }
