"""What one seed of ``sweep.py`` draws: Bedrock's quota, the policy, the traffic, the change.

Every number comes from the seed; the policy *template* is fixed (one sensible policy a
new user would write: adaptive + breaker with the documented defaults, P0 without a
chain, P1/P2 with chains, a batch job held to a 30 % class share). Demand and quotas are compared in
"concurrency equivalents": a Sonnet call at the sweep's latency scale takes about
:data:`CALL_S`, so r calls/s keep r x CALL_S in flight.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from scenario_load import Phase, Scenario, Stream

SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
#: Mean Sonnet call at latency_scale 0.3 with ~260 prompt and 40 output tokens (measured).
CALL_S = 0.5
#: Tokens/min one such call uses once settled: ~29 input tokens as the simulator counts
#: them (system prompt and question) + 40 output tokens x weight 1. (Bedrock reserves
#: max_tokens, 256, at admission and refunds the rest at the end: the reservation bounds
#: the burst, the settled use the rate.) 300 here left every tokens/min quota 4x too big.
TOKENS_PER_CALL = 70
#: Seconds of refill Bedrock's per-minute buckets hold in the sweep (Bedrock: 60).
BURST_S = 5.0
#: The surge starts between these fractions of the run and lasts SURGE_LEN of it.
SURGE_START = (0.2, 0.35)
SURGE_LEN = 0.3


@dataclass(frozen=True)
class SweepScenario(Scenario):
    """A scenario whose policy and simulator files live in the run's temporary directory."""

    policy_file: Path = Path("policy.yaml")
    sim_file: Path = Path("sim.yaml")

    @property
    def policy(self) -> Path:
        return self.policy_file

    @property
    def simulator(self) -> Path:
        return self.sim_file


@dataclass(frozen=True)
class Incident:
    seed: int
    kind: str  # concurrency | requests_per_minute | tokens_per_minute
    quota: float  # before the change, in concurrency equivalents
    quota_after_eq: float
    initial: int  # the pool's starting limit (the operator's guess)
    change_at: float  # seconds into the run
    surge: tuple[float, float]  # seconds
    demand: dict[str, float]  # concurrency equivalents per class at multiplier 1
    surge_factor: float
    model: str
    quota_after: dict[str, float]
    policy: dict[str, Any] = field(repr=False)
    sim: dict[str, Any] = field(repr=False)
    scenario: SweepScenario = field(repr=False)
    #: What ``--vary-policy`` drew instead of the template's settings ("" when it did not).
    variant: str = field(default="", repr=False)

    def placed(self, workdir: Path) -> Incident:
        sc = replace(
            self.scenario, policy_file=workdir / "policy.yaml", sim_file=workdir / "sim.yaml"
        )
        return replace(self, scenario=sc)

    def describe(self) -> str:
        change = "cut" if self.quota_after_eq < self.quota else "raise"
        peak = sum(self.demand.values()) * self.surge_factor
        return (
            f"{_short(self.kind)} quota {self.quota:.0f} -> {self.quota_after_eq:.0f} ({change} "
            f"at {self.change_at:.0f}s), start {self.initial}, demand "
            f"{sum(self.demand.values()):.0f} -> {peak:.0f}"
        )

    def p0_fits(self) -> bool:
        """P0's own peak demand fits the smallest quota of the run."""
        return self.demand["P0"] * self.surge_factor <= min(self.quota, self.quota_after_eq)


def _short(kind: str) -> str:
    return {"concurrency": "conc", "requests_per_minute": "rpm", "tokens_per_minute": "tpm"}[kind]


def _quota(kind: str, eq: float) -> dict[str, float]:
    """Bedrock's quota setting for ``eq`` concurrency equivalents."""
    if kind == "concurrency":
        return {"concurrency": max(1, round(eq))}
    per_min = eq / CALL_S * 60
    # A minute's bucket would absorb a 45 s run's overload whole: hold BURST_S of it.
    if kind == "requests_per_minute":
        return {"requests_per_minute": round(per_min), "burst_seconds": BURST_S}
    return {"tokens_per_minute": round(per_min * TOKENS_PER_CALL), "burst_seconds": BURST_S}


def draw(seed: int, duration: float, *, vary_policy: bool = False) -> Incident:
    """The seed's incident; with ``vary_policy`` the policy's control settings are drawn
    too (from a second generator, so the incident itself is the same seed's)."""
    rng = random.Random(seed)
    kind = rng.choice(["concurrency", "concurrency", "requests_per_minute", "tokens_per_minute"])
    quota = float(rng.randint(8, 24))
    initial = max(2, round(quota * rng.uniform(0.5, 2.5)))
    after = quota * (rng.uniform(0.4, 0.7) if rng.random() < 0.5 else rng.uniform(1.5, 2.5))
    base = quota * rng.uniform(0.5, 1.2)
    surge_factor = rng.uniform(1.5, 4.0)
    p0, p1 = rng.uniform(0.08, 0.3), rng.uniform(0.2, 0.4)
    demand = {"P0": base * p0, "P1": base * p1, "P2": base * (1 - p0 - p1)}
    start = rng.uniform(*SURGE_START) * duration
    surge = (start, start + SURGE_LEN * duration)
    change_at = rng.uniform(0.3, 0.55) * duration
    ceiling = math.ceil(3 * max(quota, after))
    policy = _policy(initial, max(ceiling, initial))
    variant = _vary(policy, random.Random(f"policy-{seed}")) if vary_policy else ""
    sim = {
        "latency_scale": 0.3,
        "records_kept": 0,
        "seed": seed,
        "models": {SONNET: {"quotas": _quota(kind, quota)}, HAIKU: {"quotas": {"concurrency": 80}}},
    }
    phases = (
        Phase("normal", start / duration, 1.0),
        Phase("surge", SURGE_LEN, surge_factor),
        Phase("after", 1.0 - SURGE_LEN - start / duration, 1.0),
    )
    streams = (
        Stream("orders", "P0", SONNET, rate=demand["P0"] / CALL_S, output_tokens=40),
        Stream("recommend", "P1", SONNET, rate=demand["P1"] / CALL_S, output_tokens=40),
        Stream("browse", "P2", SONNET, rate=demand["P2"] / CALL_S, output_tokens=40, prompts=30),
        Stream("analytics", "batch", SONNET, workers=rng.randint(2, 4), output_tokens=120),
    )
    scenario = SweepScenario(f"sweep-{seed}", f"sweep seed {seed}", phases, streams)
    return Incident(
        seed,
        kind,
        quota,
        after,
        initial,
        change_at,
        surge,
        demand,
        surge_factor,
        SONNET,
        _quota(kind, after),
        policy,
        sim,
        scenario,
        variant,
    )


def _vary(policy: dict[str, Any], rng: random.Random) -> str:
    """Draw the settings a user tunes (control interval and cut, tick, breaker, class shares,
    P0's wait) over what the policy check accepts; returns them in one short line."""
    tick = rng.choice([0.25, 0.5, 1.0])
    interval = rng.choice([x for x in (0.5, 1.0, 2.0, 3.0) if x >= tick])
    adaptive = policy["models"]["sonnet"]["adaptive"]
    adaptive.update(
        interval_seconds=interval,
        decrease=round(rng.uniform(0.5, 0.9), 2),
        floor=rng.choice([1, 2, 4]),
        target_p99_ms=rng.choice([2000, 3000, 5000]),
    )
    breaker = {
        "threshold": round(rng.uniform(0.05, 0.3), 2),
        "window_seconds": rng.choice([w for w in (5, 10, 20, 30) if w >= 2 * interval]),
        "min_requests": rng.choice([5, 10, 20, 50]),
        "open_seconds": rng.choice([2, 5, 10, 15]),
    }
    policy["models"]["sonnet"]["breaker"] = breaker
    policy["server"]["adaptivity"]["tick_seconds"] = tick
    prio = policy["priorities"]
    prio["P1"]["share"] = round(rng.uniform(0.5, 0.9), 2)
    prio["P2"]["share"] = round(rng.uniform(0.2, 0.6), 2)
    prio["batch"]["share"] = round(rng.uniform(0.1, 0.4), 2)
    wait = rng.choice([500, 1000, 2000, 5000])
    policy["workloads"]["orders"]["max_wait_ms"] = wait
    return (
        f"tick {tick} interval {interval} decrease {adaptive['decrease']} floor "
        f"{adaptive['floor']} p99 {adaptive['target_p99_ms']}; breaker {breaker['threshold']}/"
        f"{breaker['window_seconds']}s/{breaker['min_requests']}/{breaker['open_seconds']}s; "
        f"shares {prio['P1']['share']}/{prio['P2']['share']}/{prio['batch']['share']}; "
        f"P0 wait {wait} ms"
    )


def _policy(initial: int, ceiling: int) -> dict[str, Any]:
    """The fixed template: what a new user would write, with the seed's starting limit."""
    chain = {"text": "Busy right now: the store front page has this week's ranking."}
    return {
        "version": 1,
        "server": {
            "region": "us-east-1",
            "access_log": False,
            "unknown_models": "refuse",
            "adaptivity": {"tick_seconds": 0.5},
        },
        "identity": {"header_mode": True},
        "models": {
            "sonnet": {
                "ids": [SONNET],
                "concurrency": ceiling,
                "adaptive": {
                    "floor": 2,
                    "ceiling": ceiling,
                    "initial": initial,
                    "target_p99_ms": 3000,
                    "interval_seconds": 1,
                    "decrease": 0.7,
                },
                "breaker": {"window_seconds": 10, "min_requests": 20, "open_seconds": 5},
            },
            "haiku": {"ids": [HAIKU], "concurrency": 80},
        },
        "priorities": {
            "P0": {"share": 1.0, "on_store_failure": "open", "target_p99_ms": 3000},
            "P1": {"share": 0.7},
            "P2": {"share": 0.4},
            "batch": {"share": 0.3},
        },
        "workloads": {
            "orders": {"priority": "P0", "models": ["sonnet"], "max_wait_ms": 2000},
            "recommend": {"priority": "P1", "degrade": ["haiku"]},
            "browse": {"priority": "P2", "degrade": ["haiku", "template"], "template": chain},
            # Bounded by its class share only: a workload cap of its own would make Sluice
            # serve fewer calls than direct by policy, not by shedding.
            "analytics": {"priority": "batch"},
        },
    }
