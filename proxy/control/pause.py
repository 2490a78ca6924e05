"""Batch pause (incident 4): stop a workload while a real-time class misses its latency.

A workload with ``pause: {when_class: P0, factor: 2}`` pauses while the fleet p99 of
class P0 is above ``factor`` x P0's ``target_p99_ms``, and resumes only after the p99 has
been below ``target x factor x`` :data:`RESUME_FRACTION` for :data:`RESUME_TICKS`
consecutive ticks, so a p99 hovering at the trip point does not flap the batch on and off.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from proxy.config import PauseRule
from proxy.control.fleet import PoolTick, Window
from proxy.control.metrics import AdaptivityMetrics

log = logging.getLogger("sluice.adaptive")

RESUME_FRACTION: Final = 0.8
RESUME_TICKS: Final = 2


@dataclass(frozen=True, slots=True)
class PauseState:
    """Which workloads are paused, and for how many ticks each paused one has been calm."""

    paused: frozenset[str] = frozenset()
    calm: Mapping[str, int] = field(default_factory=dict)


def paused_workloads(
    p99_by_class: Mapping[str, float | None],
    rules: Mapping[str, PauseRule],
    targets: Mapping[str, float | None],
    previous: PauseState,
) -> PauseState:
    """The pause state after one tick with the fleet's per-class p99s (ms).

    A class with no requests in the window (p99 None) counts as calm; a rule whose class
    has no ``target_p99_ms`` never pauses (there is no promise to protect).
    """
    paused: set[str] = set()
    calm: dict[str, int] = {}
    for workload, rule in rules.items():
        target = targets.get(rule.when_class)
        if target is None:
            continue
        trip = target * rule.factor
        p99 = p99_by_class.get(rule.when_class)
        if p99 is not None and p99 > trip:
            paused.add(workload)
            calm[workload] = 0
        elif workload in previous.paused:
            quiet = p99 is None or p99 < trip * RESUME_FRACTION
            ticks = previous.calm.get(workload, 0) + 1 if quiet else 0
            if ticks < RESUME_TICKS:
                paused.add(workload)
                calm[workload] = ticks
    return PauseState(frozenset(paused), calm)


def step_pauses(
    ticks: Mapping[str, PoolTick],
    window_s: float,
    rules: Mapping[str, PauseRule],
    targets: Mapping[str, float | None],
    previous: PauseState,
    metrics: AdaptivityMetrics,
) -> PauseState:
    """One tick: the fleet p99 / throttle gauges per pool, then the pauses, logged on change."""
    by_class: dict[str, Window] = {}
    for pool, t in ticks.items():
        w = t.window(window_s)
        if w.total.requests:
            metrics.fleet_p99.labels(pool).set((w.total.p99_ms or 0.0) / 1000.0)
            metrics.fleet_throttle_ratio.labels(pool).set(w.total.throttles / w.total.requests)
        for cls, cw in w.by_class.items():
            by_class[cls] = by_class.get(cls, Window()) + cw
    if not rules:
        return previous
    p99s = {cls: w.p99_ms for cls, w in by_class.items()}
    state = paused_workloads(p99s, rules, targets, previous)
    for workload in previous.paused ^ state.paused:
        now_paused = workload in state.paused
        fields = {
            "event": "workload_pause",
            "workload": workload,
            "paused": now_paused,
            "when_class": rules[workload].when_class,
            "p99_ms": p99s.get(rules[workload].when_class),
        }
        message = f"pause {'on' if now_paused else 'off'} {workload}"
        log.warning(message, extra={"fields": fields})
    for workload in rules:
        metrics.paused.labels(workload).set(int(workload in state.paused))
    return state
