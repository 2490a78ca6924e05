"""This instance's view of the fleet's adaptive limits, and the one way it writes them.

Three things move a pool's limit: the interval's leader (the control law), a breaker that
opens (a cut) and the throttle reflex (:mod:`proxy.control.reflex`). Each write is a
compare-and-set against the limit it was computed from (``fleet_set_limit.lua``; the
reflex only ever lowers, in its own script), so a reflex that lands between a tick's read
and the leader's write is never overwritten by a value computed from the old limit. Every
write stamps its fleet time (``lim_ms``), which every tick reads back: all instances then
count outcomes from the same moment, a tick after the change (throttles seen before it
reach the fleet with the next tick of whichever instance saw them, and must not cut a
second time).
"""

from __future__ import annotations

import logging
import time
from collections import deque

from proxy.control.exchange import Reflexed
from proxy.control.fleet import FleetStats, FleetUnavailable, PoolTick
from proxy.control.metrics import AdaptivityMetrics

log = logging.getLogger("sluice.adaptive")


class FleetLimits:
    """Per pool: the fleet limit last seen, the fleet in-flight, and when outcomes count
    from; :meth:`set` writes a change."""

    def __init__(self, fleet: FleetStats, metrics: AdaptivityMetrics, tick_s: float) -> None:
        self._fleet = fleet
        self._metrics = metrics
        self._tick_ms = round(tick_s * 1000)
        self.limits: dict[str, int] = {}
        #: Fleet in-flight per pool as of the last tick or reflex (retries go only into
        #: headroom).
        self.in_flight: dict[str, int] = {}
        #: Fleet time (ms) from which each pool's outcomes count.
        self.since_ms: dict[str, int] = {}
        #: The change time last seen per pool (a new one is a change to count from).
        self._stamps: dict[str, int] = {}
        #: Per pool: (fleet ms, limit) of the recent ticks.
        self._history: dict[str, deque[tuple[int, int]]] = {}
        #: Per pool: when this instance learned of the last cut (perf_counter): a throttled
        #: call waits for a cut after its own send (the fleet's answer to its throttle), not
        #: for any change. Raises, the first limit and writes that lost do not count.
        self.cut_at: dict[str, float] = {}
        self._cut_stamps: dict[str, int] = {}
        #: Per pool: when this instance last learned a change from a reply (perf_counter).
        self._learned_at: dict[str, float] = {}

    def _stale(self, pool: str, at_ms: int | None, sent: float) -> bool:
        """Is a reply stamped ``at_ms`` to a call sent at ``sent`` (perf_counter) older
        news than a change learned since? Replies of concurrent calls (a tick, a reflex, a
        compare-and-set) are handled in any order: the older one must not put a limit back
        that the fleet has since changed. (A reply to a call sent after the learning is
        the fleet's word whatever its stamp: a failover may bring older stamps.)"""
        stamp = self._stamps.get(pool)
        return (
            stamp is not None
            and (at_ms is None or at_ms < stamp)  # unstamped: an older Sluice's write
            and sent < self._learned_at.get(pool, float("-inf"))
        )

    def _changed(self, pool: str, at_ms: int) -> None:
        self._stamps[pool] = at_ms
        self.since_ms[pool] = at_ms + self._tick_ms
        self._learned_at[pool] = time.perf_counter()

    def _cut(self, pool: str, at_ms: int, before: int | None, after: int | None) -> None:
        """A change stamped ``at_ms`` took the limit from ``before`` to ``after``: a cut
        newer than the last one seen is an answer to the throttles before it."""
        if before is None or after is None or after >= before:
            return
        if at_ms > self._cut_stamps.get(pool, -1):
            self._cut_stamps[pool] = at_ms
            self.cut_at[pool] = time.perf_counter()

    def note(self, pool: str, t: PoolTick, sent: float = float("inf")) -> None:
        """What a tick sent at ``sent`` (perf_counter) read: the limit, its change time,
        the fleet in-flight."""
        if self._stale(pool, t.limit_ms, sent):
            return
        if t.limit_ms is not None and t.limit_ms != self._stamps.get(pool):
            self._changed(pool, t.limit_ms)
            self._cut(pool, t.limit_ms, self.limits.get(pool), t.fleet_limit)
        elif t.fleet_limit is not None and t.fleet_limit != self.limits.get(pool):
            # Written without a change time (an older Sluice, or the store's own write):
            # counted as a change now.
            self.since_ms[pool] = t.now_ms + self._tick_ms
        self.in_flight[pool] = t.in_flight
        if t.fleet_limit is not None:
            self.limits[pool] = t.fleet_limit
            self._history.setdefault(pool, deque(maxlen=64)).append((t.now_ms, t.fleet_limit))

    def highest_since(self, pool: str, since_ms: int) -> int | None:
        """The highest fleet limit the ticks read since ``since_ms`` (None: none read)."""
        seen = [v for at, v in self._history.get(pool, ()) if at >= since_ms]
        return max(seen, default=None)

    def reflexed(self, pool: str, result: Reflexed, sent: float = float("inf")) -> None:
        """What a reflex sent at ``sent`` (perf_counter) read and did, acted on before the
        next tick."""
        _, before, after, at_ms, held = result
        if self._stale(pool, at_ms, sent):
            self._cut(pool, at_ms, before, after)  # it happened, before the change since
            return
        self.in_flight[pool] = held  # slots, as admission counts them (not the reading)
        if after is not None and before is not None and after < before:
            self.limits[pool] = after
            self._changed(pool, at_ms)
            self._cut(pool, at_ms, before, after)

    async def set(self, pool: str, old: int | None, new: int, reason: str) -> bool:
        """Write ``new`` if the fleet limit is still ``old`` (None: none set); True if
        written. Logged and counted; a Redis failure is logged and the next tick retries."""
        sent = time.perf_counter()
        try:
            applied, now_limit, at_ms = await self._fleet.set_limit(pool, old, new)
        except FleetUnavailable as exc:
            self._metrics.errors.labels("set_limit").inc()
            log.warning(
                "set_limit failed",
                extra={"fields": {"event": "fleet_unavailable", "pool": pool, "error": str(exc)}},
            )
            return False
        if applied:
            limit_event(self._metrics, pool, old, new, reason)
        if at_ms is not None:
            # A write that lost tells of the one that won (another instance's reflex, say):
            # a cut from the limit this write was computed from is an answer too, also when
            # a newer change has been learned since (it happened before that one).
            self._cut(pool, at_ms, old, new if applied else now_limit)
        if self._stale(pool, at_ms, sent):
            return applied
        if now_limit is not None:
            self.limits[pool] = now_limit
        if at_ms is not None:
            self._changed(pool, at_ms)
        return applied


def limit_event(
    metrics: AdaptivityMetrics, pool: str, old: int | None, new: int, reason: str
) -> None:
    """Count and log one change of a pool's fleet limit (``limit A -> B (reason)``)."""
    direction = "up" if old is None or new > old else "down"
    metrics.limit_changes.labels(pool, direction).inc()
    shown = "none" if old is None else str(old)
    fields = {"event": "adaptive_limit", "pool": pool, "old_limit": old, "new_limit": new}
    log.info(f"limit {shown} -> {new} ({reason})", extra={"fields": {**fields, "reason": reason}})
