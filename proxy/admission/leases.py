"""Bookkeeping of the leases this instance holds, and the heartbeat that keeps them alive.

A lease is a slot with an expiry (its plan's ``lease_ttl_ms``). A crashed instance stops
its heartbeat, so its slots come back within one TTL; a live one extends all its leases
of a pool in one call every TTL/3, so a long stream keeps its slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from proxy.admission.model import AdmitPlan

log = logging.getLogger("proxy.admission")

#: Longest nap of the heartbeat loop (worst extension gap: TTL/3 + this).
_NAP_S = 0.1

#: One heartbeat group: leases sharing a workload zset, TTL and counting rule.
Group = tuple[AdmitPlan, list[str]]


class LeaseBook:
    """Live leases per pool (lease id -> plan) and the heartbeat interval they need."""

    __slots__ = ("_live", "_min_ttl_ms")

    def __init__(self) -> None:
        self._live: dict[str, dict[str, AdmitPlan]] = {}
        self._min_ttl_ms = 30000

    def add(self, plan: AdmitPlan, lease: str) -> None:
        """Track a granted lease until it is settled."""
        pool = self._live.get(plan.scope)
        if pool is None:
            pool = self._live[plan.scope] = {}
        pool[lease] = plan
        if plan.lease_ttl_ms < self._min_ttl_ms:
            self._min_ttl_ms = plan.lease_ttl_ms

    def remove(self, pool: str, lease: str) -> None:
        """Stop extending ``lease`` (it was settled)."""
        live = self._live.get(pool)
        if live is not None:
            live.pop(lease, None)

    def count(self, pool: str) -> int:
        """Leases this instance holds on ``pool``."""
        return len(self._live.get(pool, ()))

    def groups(self) -> dict[str, list[Group]]:
        """Live leases per pool, grouped by workload lease zset and TTL (one call per pool)."""
        out: dict[str, list[Group]] = {}
        for pool, live in self._live.items():
            by: dict[tuple[str, int, bool], Group] = {}
            for lease, plan in live.items():
                key = (plan.keys.workload_leases, plan.lease_ttl_ms, plan.params.w_conc >= 0)
                group = by.get(key)
                if group is None:
                    group = by[key] = (plan, [])
                group[1].append(lease)
            if by:
                out[pool] = list(by.values())
        return out

    async def run_heartbeat(self, extend: Callable[[str, list[Group]], Awaitable[None]]) -> None:
        """Forever: every min TTL/3, call ``extend(pool, groups)`` for each pool with leases."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            interval = self._min_ttl_ms / 3000.0
            # Short naps so a plan with a shorter TTL is served at once, not after the
            # sleep that began under the old interval.
            await asyncio.sleep(min(interval, _NAP_S))
            if loop.time() - last < interval:
                continue
            last = loop.time()
            groups = self.groups()
            if groups:
                # A failure nobody foresaw must not end the heartbeat: every lease would
                # expire under its running call and the fleet's limits stop counting them.
                done = await asyncio.gather(
                    *(extend(pool, g) for pool, g in groups.items()), return_exceptions=True
                )
                for pool, res in zip(groups, done, strict=True):
                    if isinstance(res, Exception):
                        log.error(
                            "lease heartbeat failed", exc_info=res, extra={"fields": {"pool": pool}}
                        )
