"""Settings of the fleet loops that a policy may state but that can never take effect.

Pydantic refuses what is malformed; these are well-formed settings whose effect the other
settings cancel (a ceiling above the pool's concurrency, a share that rounds to the whole
pool, a breaker window shorter than the interval that judges it). ``sluice policy check``
prints them; ``--strict`` fails on them.
"""

from __future__ import annotations

from proxy.admission.model import class_limit
from proxy.config import Adaptive, Breaker, ModelPool, Policy
from proxy.config.references import same_model_in_two_pools


def policy_warnings(policy: Policy) -> list[str]:
    """One line per setting that cannot take effect, naming the field path at fault."""
    out: list[str] = []
    tick = policy.server.adaptivity.tick_seconds
    for name, pool in policy.models.items():
        where = f"models.{name}"
        if pool.adaptive is not None:
            out += _adaptive(where, pool, pool.adaptive, tick)
        if pool.breaker is not None:
            out += _breaker(where, pool, pool.breaker, tick)
        out += _shares(where, pool, policy)
    return out + same_model_in_two_pools(policy)


def _adaptive(where: str, pool: ModelPool, a: Adaptive, tick: float) -> list[str]:
    out: list[str] = []
    conc = pool.concurrency
    if conc is not None and a.ceiling > conc:
        out.append(
            f"{where}.adaptive.ceiling: {a.ceiling} is above the pool's concurrency {conc}; "
            f"the adaptive limit can never exceed {conc} (raise concurrency or lower the ceiling)"
        )
    top = a.ceiling if conc is None else min(a.ceiling, conc)
    if a.initial is not None and a.initial > top:
        out.append(f"{where}.adaptive.initial: {a.initial} is above the reachable maximum {top}")
    if a.floor > top:
        out.append(f"{where}.adaptive.floor: {a.floor} is above the reachable maximum {top}")
    if a.interval_seconds < tick:
        out.append(
            f"{where}.adaptive.interval_seconds: {a.interval_seconds:g} s is shorter than "
            f"server.adaptivity.tick_seconds {tick:g} s; the limit moves once per tick at most"
        )
    return out


def _breaker(where: str, pool: ModelPool, b: Breaker, tick: float) -> list[str]:
    out: list[str] = []
    judge = max(tick, pool.adaptive.interval_seconds if pool.adaptive else 0.0)
    if b.window_seconds < judge:
        out.append(
            f"{where}.breaker.window_seconds: {b.window_seconds:g} s is shorter than the "
            f"{judge:g} s interval that judges it; its outcomes are gone before they count"
        )
    if pool.adaptive is None:
        out.append(
            f"{where}.breaker: without adaptive, an open breaker refuses every class, P0 "
            "included; add adaptive so that open serves at a cut limit, highest class first"
        )
    return out


def _shares(where: str, pool: ModelPool, policy: Policy) -> list[str]:
    """A share below 1 that rounds to the whole pool at its smallest limit reserves nothing."""
    smallest = pool.adaptive.floor if pool.adaptive else pool.concurrency
    if smallest is None:
        return []
    out = []
    for cls, pc in policy.priorities.items():
        if pc.share < 1.0 and class_limit(smallest, pc.share) >= smallest:
            out.append(
                f"priorities.{cls}.share: {pc.share:g} of {where}'s smallest limit {smallest} "
                f"rounds up to all {smallest} slots; no headroom is kept for higher classes there"
            )
    return out
