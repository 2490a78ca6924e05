"""Adaptive concurrency per model pool (AIMD), and the runner that drives all of adaptivity.

:func:`next_limit` is the whole control law, pure: multiplicative decrease when Bedrock
throttled in the interval, additive increase while p99 is under target with no throttles
AND the pool actually used its limit, hold otherwise; always inside [floor, ceiling], the
ceiling never above the pool's configured concurrency.

:class:`Adaptivity` ticks in the background: it exchanges observations with the fleet
(:mod:`proxy.control.fleet`), lets the interval's leader move the limit (at most one
change per pool per interval fleet-wide: ``SET NX PX interval``), steps each pool's
breaker (:mod:`proxy.control.breaker`) and the batch pauses (:mod:`proxy.control.pause`).
The request path only calls its sync, in-memory methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.admission import Store, StoreUnavailable
from proxy.config import Adaptive
from proxy.control.breaker import CLOSED, STATE_NAMES, BreakerBoard, next_state
from proxy.control.fleet import FleetStats, FleetUnavailable, PoolControl, PoolTick, Window
from proxy.control.pause import PauseState, paused_workloads
from proxy.policy import CompiledPolicy

log = logging.getLogger("sluice.adaptive")

#: The pool counts as using its limit when its sampled peak in-flight reached this share.
BUSY_FRACTION: Final = 0.8


#: How long (in intervals) a limit that throttled stops increases just below it.
LEARN_INTERVALS = 30


@dataclass(frozen=True, slots=True)
class IntervalStats:
    """A pool's fleet-wide outcomes over one control interval."""

    requests: int
    throttles: int
    p99_ms: float | None
    #: Highest fleet in-flight sampled during the interval (every instance samples per tick).
    peak_in_flight: int


def bounds(cfg: Adaptive, configured: int | None) -> tuple[int, int]:
    """(floor, ceiling): the ceiling is capped by the configured concurrency, the floor by it."""
    ceiling = cfg.ceiling if configured is None else min(cfg.ceiling, configured)
    return min(cfg.floor, ceiling), ceiling


def start_limit(cfg: Adaptive, configured: int | None) -> int:
    """Where the limit starts: ``cfg.initial``, else the configured concurrency, in bounds."""
    floor, ceiling = bounds(cfg, configured)
    return max(floor, min(ceiling, cfg.initial or configured or ceiling))


def next_limit(
    current: int,
    stats: IntervalStats,
    cfg: Adaptive,
    configured: int | None,
    learned: int | None = None,
) -> tuple[int, str]:
    """The limit for the next interval and why; the result is always within :func:`bounds`.

    ``learned`` is the highest limit recently known not to throttle: increases stop
    there, so AIMD does not re-probe a quota it has just found every few intervals.
    """
    floor, ceiling = bounds(cfg, configured)
    if current > ceiling:
        return ceiling, f"above ceiling {ceiling}"
    if current < floor:
        return floor, f"below floor {floor}"
    if stats.throttles > 0:
        # At least one step down, or a small limit would never shrink (int(3 x 0.8) == 2
        # but int(1.6) could round back to where it was for other factors).
        new = max(floor, min(current - 1, int(current * cfg.decrease)))
        return new, f"{stats.throttles}/{stats.requests} throttled"
    if stats.p99_ms is None:
        return current, "no requests"
    if stats.p99_ms >= cfg.target_p99_ms:
        return current, f"p99 {stats.p99_ms:.0f} ms >= target {cfg.target_p99_ms:.0f} ms"
    if stats.peak_in_flight < math.ceil(BUSY_FRACTION * current):
        # An idle pool proves nothing about more concurrency: growing it would only arm a
        # burst that the quota then throttles.
        return current, f"peak in-flight {stats.peak_in_flight} well under limit {current}"
    if current >= ceiling:
        return current, f"at ceiling {ceiling}"
    if learned is not None and current >= learned:
        return current, f"holding at {current}: Bedrock throttled above {learned} recently"
    new = min(ceiling, current + cfg.increase, learned if learned is not None else ceiling)
    return new, f"p99 {stats.p99_ms:.0f} ms < {cfg.target_p99_ms:.0f} ms, no throttles, busy"


class LearnedQuota:
    """Per pool, the highest limit recently known not to throttle (kept LEARN_INTERVALS).

    Every instance sees the same fleet window, so every instance learns the same value and
    whichever one leads the next interval applies it.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float]] = {}

    def update(
        self, pool: str, stats: IntervalStats, interval_s: float, now: float | None = None
    ) -> int | None:
        """Take one interval's fleet stats; return what is known now (None: nothing)."""
        now = time.monotonic() if now is None else now
        kept = self._seen.get(pool)
        value = kept[0] if kept is not None and now < kept[1] else None
        # The evidence is the fleet's peak in-flight while Bedrock throttled: that is the
        # concurrency it refused. The limit in force is not: throttles lag a cut by up to
        # an interval and would teach a quota far below the real one. The peak is sampled
        # per tick, so it can only under-read the true one; a later throttled interval with
        # a lower sampled peak (the lagging throttles of a cut) must not lower what was
        # learned, or the pool stays pinned far below its quota for LEARN_INTERVALS.
        if stats.throttles > 0 and stats.peak_in_flight > 1:
            seen = stats.peak_in_flight - 1
            value = seen if value is None else max(seen, value)
            self._seen[pool] = (value, now + LEARN_INTERVALS * interval_s)
        return value


def underutilised(limit: int, stats: IntervalStats, cfg: Adaptive, configured: int | None) -> bool:
    """Incident 3's alarm: at the ceiling, traffic, no throttles, p99 under half the target."""
    return (
        limit >= bounds(cfg, configured)[1]
        and stats.requests > 0
        and stats.throttles == 0
        and stats.p99_ms is not None
        and stats.p99_ms < cfg.target_p99_ms / 2
    )


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
        self.underutilised = Gauge(
            "sluice_adaptive_underutilised",
            "1 when a pool sits at its ceiling with no throttles and p99 under half the target.",
            ["pool"],
            registry=r,
        )
        self.limit_changes = Counter(
            "sluice_adaptive_limit_changes",
            "Limit changes made by this instance as leader.",
            ["pool", "direction"],
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
            "Failures of the fleet exchange (tick, transition, set_limit, unexpected).",
            ["operation"],
            registry=r,
        )


def _event(level: int, event: str, message: str, **fields: object) -> None:
    """One structured line: a readable ``message`` plus stable fields (see ``proxy.log``)."""
    log.log(level, message, extra={"fields": {"event": event, **fields}})


class Adaptivity:
    """Adaptive limits, breakers and batch pauses for one instance, shared with its fleet.

    Request path (sync, no I/O, never raises): :meth:`observe`, :meth:`breaker_allows`,
    :meth:`paused`, :meth:`limit`. Everything else happens in one background task.
    """

    def __init__(
        self,
        policy: CompiledPolicy,
        store: Store,
        redis_url: str | None,
        *,
        registry: CollectorRegistry | None = None,
        tick_s: float = 1.0,
        bucket_s: float | None = None,
        pause_window_s: float = 10.0,
        timeout_s: float = 0.25,
        stale_after_s: float | None = None,
        instance_id: str | None = None,
    ) -> None:
        """``bucket_s`` (default: the tick, at most 1 s) is the fleet's time resolution."""
        pol = policy.policy
        self._store = store
        self._tick_s = tick_s
        self._pause_window_s = pause_window_s
        self._stale_after_s = stale_after_s or max(5.0, 5 * tick_s)
        self._adaptive = {n: p.adaptive for n, p in pol.models.items() if p.adaptive}
        self._breakers = {n: p.breaker for n, p in pol.models.items() if p.breaker}
        self._configured = {n: p.concurrency for n, p in pol.models.items()}
        self._rules = {n: w.pause for n, w in pol.workloads.items() if w.pause}
        self._targets = {n: c.target_p99_ms for n, c in pol.priorities.items()}
        self._pools = list(pol.models)
        longest = max(
            [pause_window_s, tick_s]
            + [b.window_seconds for b in self._breakers.values()]
            + [a.interval_seconds for a in self._adaptive.values()]
        )
        self.instance_id = instance_id or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self.fleet = FleetStats(
            redis_url,
            store,
            instance_id=self.instance_id,
            longest_window_s=longest,
            bucket_s=bucket_s or min(1.0, tick_s),
            timeout_s=timeout_s,
        )
        self.breakers = BreakerBoard()
        self.metrics = AdaptivityMetrics(registry or CollectorRegistry())
        self._limits: dict[str, int] = {}
        self._learned = LearnedQuota()
        self._pause = PauseState()
        self._last_ok = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # --- request path --------------------------------------------------------------------

    def observe(
        self, pool: str, priority: str, latency_ms: float, throttled: bool, server_error: bool
    ) -> None:
        """Count one finished upstream call (throttled: Bedrock 429; server_error: 5xx)."""
        self.fleet.observe(pool, priority, latency_ms, throttled, server_error)
        self.breakers.outcome(pool, throttled or server_error)

    def breaker_allows(self, pool: str) -> bool:
        """May a call go to ``pool``? False while open, or half-open without a probe slot."""
        if pool not in self._breakers or self.breakers.allow(pool):
            return True
        self.metrics.breaker_refused.labels(pool).inc()
        return False

    def paused(self, workload: str) -> bool:
        """True while ``workload`` is paused for a real-time class (incident 4)."""
        return workload in self._pause.paused

    def limit(self, pool: str) -> int | None:
        """The fleet's adaptive limit of ``pool`` as last seen (None: not adaptive / unknown)."""
        return self._limits.get(pool)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start ticking; an unreachable Redis is logged and retried each tick, not raised."""
        try:
            await self.fleet.start()
        except FleetUnavailable as exc:
            self.metrics.errors.labels("tick").inc()
            _event(
                logging.WARNING, "fleet_unavailable", "fleet unavailable at start", error=str(exc)
            )
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop ticking and close the fleet connections."""
        self._closing = True
        if self._task is not None:
            while not self._task.done():
                # Re-sent because a cancel that races a Redis timeout can be swallowed on
                # the way (seen with redis-py on 3.11); the flag then ends the loop anyway.
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=0.1)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.fleet.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            started = loop.time()
            try:
                await self.tick()
            except Exception:
                # A bug here must not stop adaptivity for good: log it loudly and go on.
                self.metrics.errors.labels("unexpected").inc()
                log.exception("adaptivity tick failed", extra={"fields": {"event": "tick_bug"}})
            await asyncio.sleep(max(0.0, self._tick_s - (loop.time() - started)))

    # --- one tick ------------------------------------------------------------------------

    async def tick(self) -> None:
        """Exchange with the fleet, then step every breaker, controller and pause."""
        controls = {pool: self._control(pool) for pool in self._pools}
        try:
            ticks = await self.fleet.exchange(controls)
        except FleetUnavailable as exc:
            self.metrics.errors.labels("tick").inc()
            _event(logging.WARNING, "fleet_unavailable", "fleet tick failed", error=str(exc))
            if self.breakers.fresh and time.monotonic() - self._last_ok > self._stale_after_s:
                # Limiters fail open: a breaker must not hold a pool shut on old news.
                self.breakers.fresh = False
                _event(
                    logging.ERROR,
                    "fleet_stale",
                    "fleet view stale: breakers fail open",
                    stale_after_s=self._stale_after_s,
                )
            return
        self._last_ok = time.monotonic()
        self.breakers.fresh = True
        for pool, t in ticks.items():
            if pool in self._breakers:
                await self._step_breaker(pool, t)
            if pool in self._adaptive:
                await self._step_limit(pool, t)
        self._step_pause(ticks)

    def _control(self, pool: str) -> PoolControl:
        adaptive, breaker = self._adaptive.get(pool), self._breakers.get(pool)
        px = round(adaptive.interval_seconds * 1000) if adaptive else 0
        if breaker is None:
            return PoolControl(leader_px=px)
        op, gen, ok, fail = self.breakers.probe_request(pool)
        return PoolControl(px, op, gen, breaker.half_open_probes, ok, fail)

    async def _step_breaker(self, pool: str, t: PoolTick) -> None:
        cfg = self._breakers[pool]
        rec = t.breaker
        self.breakers.update(pool, rec, t.probe_granted)
        # Only outcomes since the breaker last closed count toward opening it again.
        since = rec.since_ms if rec.state == CLOSED and rec.gen else None
        window = t.window(cfg.window_seconds, since_ms=since).total
        move = next_state(rec, window.requests, window.failures, cfg, t.now_ms)
        if move is not None:
            state, reason = move
            try:
                applied, after = await self.fleet.transition(pool, rec.gen, state)
            except FleetUnavailable as exc:
                self.metrics.errors.labels("transition").inc()
                _event(
                    logging.WARNING,
                    "fleet_unavailable",
                    "breaker transition failed",
                    pool=pool,
                    error=str(exc),
                )
                return
            self.breakers.update(pool, after, False)
            if applied:
                self.metrics.breaker_transitions.labels(pool, STATE_NAMES[state]).inc()
                _event(
                    logging.WARNING,
                    "breaker_transition",
                    f"breaker {STATE_NAMES[rec.state]} -> {STATE_NAMES[state]} ({reason})",
                    pool=pool,
                    from_state=STATE_NAMES[rec.state],
                    to_state=STATE_NAMES[state],
                    reason=reason,
                )
        self.metrics.breaker_state.labels(pool).set(self.breakers.state(pool))

    async def _step_limit(self, pool: str, t: PoolTick) -> None:
        cfg, configured = self._adaptive[pool], self._configured[pool]
        w = t.window(cfg.interval_seconds)
        stats = IntervalStats(w.total.requests, w.total.throttles, w.total.p99_ms, w.peak_in_flight)
        if t.fleet_limit is not None:
            self._limits[pool] = t.fleet_limit
        learned = self._learned.update(pool, stats, cfg.interval_seconds)
        if t.leader:
            if t.fleet_limit is None:
                # First start, or Redis lost the limit: restore what this instance last saw.
                floor, ceiling = bounds(cfg, configured)
                new = self._limits.get(pool) or start_limit(cfg, configured)
                new, reason = max(floor, min(ceiling, new)), "initial"
            else:
                new, reason = next_limit(t.fleet_limit, stats, cfg, configured, learned)
            if new != t.fleet_limit:
                await self._set_limit(pool, t.fleet_limit, new, reason)
        current = self._limits.get(pool)
        if current is not None:
            self.metrics.limit.labels(pool).set(current)
            idle = underutilised(current, stats, cfg, configured)
            self.metrics.underutilised.labels(pool).set(int(idle))

    async def _set_limit(self, pool: str, old: int | None, new: int, reason: str) -> None:
        try:
            await self._store.set_pool_limit(pool, new)
        except StoreUnavailable as exc:
            self.metrics.errors.labels("set_limit").inc()
            _event(
                logging.WARNING,
                "store_unavailable",
                "set_pool_limit failed",
                pool=pool,
                error=str(exc),
            )
            return
        self._limits[pool] = new
        direction = "up" if old is None or new > old else "down"
        self.metrics.limit_changes.labels(pool, direction).inc()
        shown = "none" if old is None else str(old)
        _event(
            logging.INFO,
            "adaptive_limit",
            f"limit {shown} -> {new} ({reason})",
            pool=pool,
            old_limit=old,
            new_limit=new,
            reason=reason,
        )

    def _step_pause(self, ticks: dict[str, PoolTick]) -> None:
        by_class: dict[str, Window] = {}
        for pool, t in ticks.items():
            w = t.window(self._pause_window_s)
            if w.total.requests:
                p99 = w.total.p99_ms or 0.0
                self.metrics.fleet_p99.labels(pool).set(p99 / 1000.0)
                ratio = w.total.throttles / w.total.requests
                self.metrics.fleet_throttle_ratio.labels(pool).set(ratio)
            for cls, cw in w.by_class.items():
                by_class[cls] = by_class.get(cls, Window()) + cw
        if not self._rules:
            return
        p99s = {cls: w.p99_ms for cls, w in by_class.items()}
        before = self._pause.paused
        self._pause = paused_workloads(p99s, self._rules, self._targets, self._pause)
        for workload in before ^ self._pause.paused:
            now_paused = workload in self._pause.paused
            rule = self._rules[workload]
            _event(
                logging.WARNING,
                "workload_pause",
                f"pause {'on' if now_paused else 'off'} {workload}",
                workload=workload,
                paused=now_paused,
                when_class=rule.when_class,
                p99_ms=p99s.get(rule.when_class),
            )
        for workload in self._rules:
            self.metrics.paused.labels(workload).set(int(workload in self._pause.paused))
