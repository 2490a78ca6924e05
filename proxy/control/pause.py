"""Batch pause (incident 4): stop a workload while a real-time class misses its latency.

A workload with ``pause: {when_class: P0, factor: 2}`` pauses while the fleet p99 of
class P0 is above ``factor`` x P0's ``target_p99_ms``, and resumes only after the p99 has
been below ``target x factor x`` :data:`RESUME_FRACTION` for :data:`RESUME_TICKS`
consecutive ticks, so a p99 hovering at the trip point does not flap the batch on and off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from proxy.config import PauseRule

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
