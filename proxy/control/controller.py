"""The runner that drives all of adaptivity: adaptive limits, breakers and batch pauses.

The control law itself is pure and lives in :mod:`proxy.control.law`.
:class:`Adaptivity` ticks in the background: it exchanges observations with the fleet
(:mod:`proxy.control.fleet`), lets the interval's leader move the limit (at most one
law change per pool per interval fleet-wide: ``SET NX PX interval``), steps each pool's
breaker (:mod:`proxy.control.breaker`; opening it cuts the limit at once), the priority
hold (:mod:`proxy.control.hold`) and the batch pauses (:mod:`proxy.control.pause`).
Between ticks, a throttle lowers the limit at once (:mod:`proxy.control.reflex`); every
write goes through :mod:`proxy.control.limits`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time

from prometheus_client import CollectorRegistry

from proxy.admission import Store
from proxy.control.breaker import (
    CLOSED,
    OPEN,
    STATE_NAMES,
    BreakerBoard,
    next_state,
    next_state_cut,
)
from proxy.control.fleet import FleetStats, FleetUnavailable, PoolControl, PoolTick
from proxy.control.hold import HOLD_TICKS, PriorityHold, poll_until
from proxy.control.law import (
    IntervalStats,
    LearnedQuota,
    bounds,
    cut,
    for_concurrency,
    interval_stats,
    next_limit,
    start_limit,
    underutilised,
)
from proxy.control.limits import FleetLimits
from proxy.control.metrics import AdaptivityMetrics
from proxy.control.pause import PauseState, step_pauses
from proxy.control.reflex import ThrottleReflex
from proxy.errors import BedrockError
from proxy.policy import CompiledPolicy
from proxy.tasks import STOP_TIMEOUT_S, stop_task

log = logging.getLogger("sluice.adaptive")


def _event(level: int, event: str, message: str, **fields: object) -> None:
    """One structured line: a readable ``message`` plus stable fields (see ``proxy.log``)."""
    log.log(level, message, extra={"fields": {"event": event, **fields}})


def refused_before_model(status: int) -> bool:
    """Bedrock refused the call before any model work: any 4xx but 408 (the model timed
    out), 424 (the model failed) and 429 (a throttle): bad input, an account quota
    (``ServiceQuotaExceededException``), no access or bad credentials, an unknown model, a
    body too large. Such an answer comes back in milliseconds and says nothing of the
    pool's load: a caller sending a stream of them (a bug, a revoked model access) would
    pull the controller's p99 and mean call length down and dilute the breaker's share of
    failed calls, so it is left out of the fleet's outcomes."""
    return 400 <= status < 500 and status not in (408, 424, 429)


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
        self._tick_s = tick_s
        self._pause_window_s = pause_window_s
        self._stale_after_s = stale_after_s or max(5.0, 5 * tick_s)
        self._read_policy(policy)
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
        self.hold = PriorityHold(HOLD_TICKS * tick_s)
        self.metrics = AdaptivityMetrics(registry or CollectorRegistry())
        floors = {n: bounds(a, self._configured[n])[0] for n, a in self._adaptive.items()}
        self.limits = FleetLimits(self.fleet, self.metrics, tick_s)
        self.reflex = ThrottleReflex(self.fleet, self.metrics, floors, self.limits.reflexed)
        self._learned = LearnedQuota()
        self._pause = PauseState()
        self._last_ok = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def _read_policy(self, policy: CompiledPolicy) -> None:
        """What the ticks need from the policy, per pool / workload / class."""
        pol = policy.policy
        self._adaptive = {n: p.adaptive for n, p in pol.models.items() if p.adaptive}
        self._breakers = {n: p.breaker for n, p in pol.models.items() if p.breaker}
        self._configured = {n: p.concurrency for n, p in pol.models.items()}
        self._rules = {n: w.pause for n, w in pol.workloads.items() if w.pause}
        self._targets = {n: c.target_p99_ms for n, c in pol.priorities.items()}
        self._pools = list(pol.models)
        self._shedding = set(self._adaptive) | set(self._breakers)
        self._ranks = dict(policy.ranks)
        self._shares = {n: c.share for n, c in pol.priorities.items()}
        self._by_rank = {rank: name for name, rank in policy.ranks.items()}

    # --- request path --------------------------------------------------------------------

    def observe(
        self,
        pool: str,
        priority: str,
        latency_ms: float,
        throttled: bool,
        server_error: bool,
        lease: str | None = None,
        reflex: bool = True,
        refused: bool = False,
        unanswered: bool = False,
    ) -> None:
        """Count one finished upstream call (throttled: Bedrock 429; server_error: 5xx;
        ``lease``: the call's pool lease, for the throttle reflex; ``reflex`` False: this
        throttle already fired it, when it arrived; ``refused``: Bedrock refused it before
        any model work, see :func:`refused_before_model`; ``unanswered``: not answered within
        the read timeout)."""
        if refused:
            # No sample of the pool's load or health; as a half-open probe's answer it
            # still says Bedrock answered (it did, with no error of its own).
            self.breakers.outcome(pool, False)
            return
        if unanswered:
            # No answer within the read timeout: its time is a latency sample (the p99
            # holds the limit in a brownout), not a served call for Little's law nor an
            # outcome for the failure share (a long prompt's own timeout is no sign of an
            # overloaded pool); a probe that got no answer did fail.
            self.fleet.observe_latency(pool, priority, latency_ms)
            self.breakers.outcome(pool, True)
            return
        self.fleet.observe(pool, priority, latency_ms, throttled, server_error)
        self.breakers.outcome(pool, throttled or server_error)
        if throttled and priority in self._ranks:
            # Every pool: a downgrade onto one that sheds nothing is held too (see
            # :meth:`downgrade_held_by`); calls that ask for it directly are not.
            self.hold.throttled(pool, self._ranks[priority])
        if throttled and reflex:
            self.reflex.fire(pool, lease)

    def observe_status(
        self,
        pool: str,
        priority: str,
        latency_ms: float,
        status: int,
        *,
        on_pool: bool = True,
        lease: str | None = None,
        reflex: bool = True,
        unanswered: bool = False,
    ) -> None:
        """:meth:`observe` of a call answered with HTTP ``status`` (live or a batch
        record's): a 429 on a tier with a quota of its own (``on_pool`` False) is not the
        pool's throttle."""
        self.observe(
            pool,
            priority,
            latency_ms,
            throttled=status == 429 and on_pool,
            server_error=status >= 500,
            lease=lease,
            reflex=reflex,
            refused=refused_before_model(status),
            unanswered=unanswered,
        )

    def refused(self, pool: str, priority: str, refusal: BedrockError) -> None:
        """Count a refusal as demand if more pool concurrency would have admitted the call
        (pool or class concurrency, the queue); not a workload's own caps or rate buckets."""
        if refusal.status == 429 and for_concurrency(refusal.headers, refusal.message):
            self.fleet.observe_demand(pool, priority)

    def breaker_allows(self, pool: str) -> bool:
        """May a call go to ``pool``? False only for a breaker without a limit to cut.

        A pool with an adaptive limit keeps serving while its breaker is open, at the cut
        limit (admission sheds, highest class first); a pool without one can only refuse
        while open and let probes through while half-open.
        """
        if pool not in self._breakers or pool in self._adaptive or self.breakers.allow(pool):
            return True
        self.metrics.breaker_refused.labels(pool).inc()
        return False

    def retry_headroom(self, pool: str) -> bool:
        """May a throttled call to ``pool`` be retried? Only into headroom under the limit
        (a retry at a full limit is one more call at a quota Bedrock just said is spent)."""
        limit = self.limits.limits.get(pool)
        if pool not in self._adaptive or limit is None:
            return True
        return self.breakers.state(pool) == CLOSED and self.limits.in_flight.get(pool, 0) < limit

    async def await_headroom(self, pool: str, wait_s: float) -> bool:
        """:meth:`retry_headroom`, waiting up to ``wait_s`` for it (checked once per tick)."""
        return await poll_until(lambda: self.retry_headroom(pool), wait_s, self._tick_s)

    def held_by(self, pool: str, priority: str) -> str | None:
        """The class whose Bedrock throttles hold ``priority`` back on ``pool`` (or None);
        only on pools that shed (an adaptive limit or a breaker)."""
        return self.downgrade_held_by(pool, priority) if pool in self._shedding else None

    def downgrade_held_by(self, pool: str, priority: str) -> str | None:
        """The class whose Bedrock throttles hold a downgrade of ``priority`` back from
        ``pool``, on any pool (or None).

        A downgrade is load Sluice adds that its caller never asked that pool for; while
        Bedrock throttles a higher class there, every one of them takes a slot or request
        that class needs (a P0 workload on the fallback model failed more often through
        Sluice than without it, the lower classes' refusals degraded onto its model).
        """
        rank = self._ranks.get(priority)
        held = None if rank is None else self.hold.holder(pool, rank)
        return None if held is None else self._by_rank[held]

    async def await_release(self, pool: str, priority: str, wait_s: float) -> bool:
        """Wait up to ``wait_s`` for the hold on ``priority`` to end (checked each tick)."""
        return await poll_until(lambda: not self.held_by(pool, priority), wait_s, self._tick_s)

    def paused(self, workload: str) -> bool:
        """True while ``workload`` is paused for a real-time class (incident 4)."""
        return workload in self._pause.paused

    def limit(self, pool: str) -> int | None:
        """The fleet's adaptive limit of ``pool`` as last seen (None: not adaptive / unknown)."""
        return self.limits.limits.get(pool)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start ticking; an unreachable Redis is logged and retried each tick, not raised."""
        try:
            await self.fleet.start()
        except FleetUnavailable as exc:
            self._failed("tick", "fleet_unavailable", "fleet unavailable at start", exc)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop ticking and close the fleet connections."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None and not await stop_task(task):
            # A reload awaits this: never hang it. The flag ends the loop at its next turn.
            log.error(
                "adaptivity tick did not stop within %.0f s; left to finish on its own",
                STOP_TIMEOUT_S,
                extra={"fields": {"event": "tick_stuck", "stack": repr(task.get_stack(limit=5))}},
            )
        await self.reflex.close()
        await self.fleet.close()

    def _failed(self, stage: str, event: str, msg: str, exc: Exception, **fields: object) -> None:
        """Count and log a failed Redis step; the next tick tries again (limiters fail open)."""
        self.metrics.errors.labels(stage).inc()
        _event(logging.WARNING, event, msg, **fields, error=str(exc))

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
        sent = time.perf_counter()
        try:
            ticks = await self.fleet.exchange(controls)
        except FleetUnavailable as exc:
            self._failed("tick", "fleet_unavailable", "fleet tick failed", exc)
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
        self.hold.prune()
        for pool, t in ticks.items():
            # And the bucket before: another instance may write it after this one read it.
            self.hold.hear(pool, t.window(self._tick_s + t.bucket_ms / 1000), self._ranks)
            if pool in self._shedding:
                self.hold.show(pool, self._ranks, self.metrics.holding)
            if pool in self._adaptive:
                self.limits.note(pool, t, sent)
                self._note_granted(pool, t)
            if pool in self._breakers:
                await self._step_breaker(pool, t)
            if pool in self._adaptive:
                await self._step_limit(pool, t)
        self._pause = step_pauses(
            ticks, self._pause_window_s, self._rules, self._targets, self._pause, self.metrics
        )

    def _control(self, pool: str) -> PoolControl:
        adaptive, breaker = self._adaptive.get(pool), self._breakers.get(pool)
        px = round(adaptive.interval_seconds * 1000) if adaptive else 0
        if breaker is None or adaptive is not None:
            return PoolControl(leader_px=px)  # a cut-limit breaker needs no probe slots
        op, gen, ok, fail = self.breakers.probe_request(pool)
        return PoolControl(px, op, gen, breaker.half_open_probes, ok, fail)

    async def _step_breaker(self, pool: str, t: PoolTick) -> None:
        cfg = self._breakers[pool]
        rec = t.breaker
        self.breakers.update(pool, rec, t.probe_granted)
        cuts = pool in self._adaptive
        # Only outcomes since the last transition count toward the next one (probe
        # breakers count probes while open / half-open, so only closed looks back).
        since = rec.since_ms if rec.gen and (cuts or rec.state == CLOSED) else None
        window = t.window(cfg.window_seconds, since_ms=since).total
        law = next_state_cut if cuts else next_state
        move = law(rec, window.requests, window.failures, cfg, t.now_ms)
        if move is not None:
            state, reason = move
            try:
                applied, after = await self.fleet.transition(pool, rec.gen, state)
            except FleetUnavailable as exc:
                msg = "breaker transition failed"
                self._failed("transition", "fleet_unavailable", msg, exc, pool=pool)
                return
            self.breakers.update(pool, after, False)
            if applied and cuts and state == OPEN:
                await self._cut_on_open(pool, t)
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

    async def _cut_on_open(self, pool: str, t: PoolTick) -> None:
        """The breaker just opened: cut from the highest limit of the last interval, unless
        the limit already fell that far since (the leader's cut for the same throttles, not
        a second one); a write that lost to another is retried once from what won."""
        cfg, current = self._adaptive[pool], t.fleet_limit
        if current is None:
            return
        interval_ms = round(cfg.interval_seconds * 1000)
        before = self.limits.highest_since(pool, t.now_ms - interval_ms) or current
        floor = bounds(cfg, self._configured[pool])[0]
        new = max(floor, cut(before, cfg, self._learned.known(pool)))
        for _ in range(2):
            if new >= current or await self.limits.set(pool, current, new, "breaker opened"):
                return
            current = self.limits.limits.get(pool, new)

    def _note_granted(self, pool: str, t: PoolTick) -> None:
        """The reflex's floor: what Bedrock served over the whole interval, or over the last
        two mean calls (at least a tick) where that is lower, not only since the last change
        (right after one that window is empty). Over a whole long interval alone it is the
        level from before a quota cut: with a 3 s interval the reflex could not follow a cut
        for 3 s, and calls admitted one slot above the new quota were throttled again and
        again. Never above the whole interval's: one long call ending in a short window
        would read high."""
        interval = self._adaptive[pool].interval_seconds
        full = interval_stats(t, interval, None, self._tick_s, {})
        granted = full.granted
        if granted is not None and full.served > 0:
            window = min(interval, max(self._tick_s, 2.0 * full.busy_ms / full.served / 1000))
            short = interval_stats(t, window, None, self._tick_s, {}).granted
            granted = granted if short is None else min(granted, short)
        if granted is None:
            self.reflex.granted.pop(pool, None)  # nothing to go by: not an old, higher level
        else:
            self.reflex.granted[pool] = granted

    async def _step_limit(self, pool: str, t: PoolTick) -> None:
        cfg, configured = self._adaptive[pool], self._configured[pool]
        stats = self._interval_stats(pool, t)
        recent = t.latest_throttle(cfg.interval_seconds + self._tick_s)
        calls = self._learned.count_calls(pool, t)
        learned = self._learned.update(
            pool, stats, cfg.interval_seconds, throttled_at=recent, calls=calls
        )
        known, state = self._learned.known(pool), self.breakers.state(pool)
        self.metrics.learned_quota.labels(pool).set(known or 0)
        current = self.limits.limits.get(pool)
        new: int | None = None
        reason = ""
        if current is not None:
            new, reason = next_limit(
                current, stats, cfg, configured, learned, known=known, breaker=state
            )
        if t.leader:
            await self._lead(pool, t, new, reason)
        if pool in self.limits.limits:
            self.metrics.limit.labels(pool).set(self.limits.limits[pool])
        if current is not None:
            idle = underutilised(current, stats, cfg, configured, new, learned)
            self.metrics.underutilised.labels(pool).set(int(idle))

    def _interval_stats(self, pool: str, t: PoolTick) -> IntervalStats:
        """The fleet's outcomes for ``pool`` over its interval, as the control law reads them."""
        interval, since = self._adaptive[pool].interval_seconds, self.limits.since_ms.get(pool)
        return interval_stats(t, interval, since, self._tick_s, self._shares)

    async def _lead(self, pool: str, t: PoolTick, new: int | None, reason: str) -> None:
        """This instance leads the interval: write the limit the law chose (or the first)."""
        if t.fleet_limit is None:
            # First start, or Redis lost the limit: restore what this instance last saw.
            cfg, configured = self._adaptive[pool], self._configured[pool]
            floor, ceiling = bounds(cfg, configured)
            first = self.limits.limits.get(pool) or start_limit(cfg, configured)
            await self.limits.set(pool, None, max(floor, min(ceiling, first)), "initial")
        elif new is not None and new != t.fleet_limit:
            await self.limits.set(pool, t.fleet_limit, new, reason)
