"""The metrics of the fleet loops: adaptive limits, breakers, pauses, fleet exchange."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class AdaptivityMetrics:
    """The adaptivity metrics, registered in the application's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.limit = Gauge(
            "sluice_adaptive_limit",
            "Fleet adaptive concurrency limit per pool.",
            ["pool"],
            registry=r,
        )
        self.learned_quota = Gauge(
            "sluice_adaptive_learned_quota",
            "Concurrency at which Bedrock last throttled the pool, as the fleet learned it "
            "(0: never; growth stops there while fresh, then probes above it).",
            ["pool"],
            registry=r,
        )
        self.holding = Gauge(
            "sluice_priority_holding",
            "1 while Bedrock's throttles of this class hold every lower class back on the pool.",
            ["pool", "priority"],
            registry=r,
        )
        self.underutilised = Gauge(
            "sluice_adaptive_underutilised",
            "1 when a pool sits at its ceiling with no throttles and p99 under half the target.",
            ["pool"],
            registry=r,
        )
        self.limit_changes = Counter(
            "sluice_adaptive_limit_changes",
            "Limit changes made by this instance (as leader, or by its throttle reflex).",
            ["pool", "direction"],
            registry=r,
        )
        self.reflexes = Counter(
            "sluice_adaptive_reflexes",
            "Limit cuts made at a throttle by this instance's reflex (also in limit_changes).",
            ["pool"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "sluice_breaker_state",
            "Circuit state per pool: 0 closed, 1 half-open, 2 open.",
            ["pool"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "sluice_breaker_transitions",
            "Breaker transitions applied by this instance.",
            ["pool", "to"],
            registry=r,
        )
        self.breaker_refused = Counter(
            "sluice_breaker_refused",
            "Requests refused because the pool's breaker is open.",
            ["pool"],
            registry=r,
        )
        self.paused = Gauge(
            "sluice_workload_paused",
            "1 while a workload is paused for a real-time class.",
            ["workload"],
            registry=r,
        )
        self.fleet_p99 = Gauge(
            "sluice_fleet_p99_seconds",
            "Fleet upstream p99 latency per pool (pause window).",
            ["pool"],
            registry=r,
        )
        self.fleet_throttle_ratio = Gauge(
            "sluice_fleet_throttle_ratio",
            "Fleet share of upstream calls throttled (pause window).",
            ["pool"],
            registry=r,
        )
        self.errors = Counter(
            "sluice_fleet_errors",
            "Failures of the fleet exchange (tick, transition, set_limit, reflex, unexpected).",
            ["operation"],
            registry=r,
        )
