"""The adaptive control law, pure: what the pool's limit should be next interval, and why.

Growth is driven by demand, not by what got through: a call refused or given up queueing
for concurrency (pool, class share or queue) is demand Bedrock never saw, so a pool whose
callers are refused at a class share still grows. While demand exceeds the limit, p99 is
under target and Bedrock does not throttle, the limit grows:

* **slow start** (doubling) until Bedrock throttles for the first time or the ceiling;
* **additive** (``increase``) up to a quota learned from Bedrock's answers;
* **probing** above a quota learned earlier but no longer fresh: one slot, then twice as
  far above the old quota each interval in which calls filled the limit without a
  throttle (refused demand alone proves nothing above a quota), so a raised quota is
  found in a few intervals while a quota that did not move costs one small overshoot
  (which the throttle reflex takes back at the first throttle).

A throttled interval cuts the limit by ``decrease``, and further when Bedrock's answers
say its quota is lower (:func:`cut`) -- by at most half in one step. The learned quota
comes from Bedrock's answers: the fleet in-flight at the moments Bedrock throttled (read
at the throttle itself by the reflex, :mod:`proxy.control.reflex`; bounded below by what it
served on average, Little's law), so it holds whichever quota binds (requests/min,
tokens/min or concurrency: each refuses at some concurrency). The fleet's latest throttle
replaces it, so a quota cut is learned on the next throttle instead of the highest value
being remembered, and every instance learns the same value.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from proxy.config import Adaptive
from proxy.control.breaker import CLOSED, OPEN
from proxy.control.window import PoolTick

#: The pool counts as using its limit when its sampled peak in-flight reached this share.
BUSY_FRACTION: Final = 0.8
#: How long (in intervals) a learned quota stops growth at it at most (a pool with too few
#: calls to reach :data:`PROBE_CALLS`); then growth probes above it.
LEARN_INTERVALS: Final = 60
#: ... and at least (with :data:`PROBE_CALLS`): a busy pool probes sooner, a raise is found
#: sooner, and each probe still comes after enough calls to pay for itself.
MIN_FRESH_INTERVALS: Final = 3
#: Upstream calls after which a learned quota may be probed again. A failed probe costs
#: about one throttle (the reflex reverts it at once), so probing at most once per this
#: many calls keeps probing's throttles under half a percent of the pool's calls, on a
#: small quota or a large one alike (a fixed time would not: 15 s is 75 calls at 5 in
#: flight, 700 at 24).
PROBE_CALLS: Final = 200
#: A throttled interval settles the limit at this share of the concurrency Bedrock granted.
SETTLE: Final = 0.9
#: One throttled interval never cuts more than this share of the limit.
MAX_CUT: Final = 0.5


@dataclass(frozen=True, slots=True)
class IntervalStats:
    """A pool's fleet-wide outcomes over one control interval."""

    requests: int
    throttles: int
    p99_ms: float | None
    #: Highest fleet in-flight sampled during the interval (every instance samples per tick).
    peak_in_flight: int
    #: Calls refused or given up queueing for concurrency (demand Bedrock never saw).
    demand: int = 0
    #: Milliseconds Bedrock spent on the calls it served (200) that ended in the interval.
    busy_ms: float = 0.0
    #: The interval's length in ms (0: unknown).
    span_ms: float = 0.0
    #: Highest fleet in-flight sampled in a moment Bedrock throttled (None: no such sample).
    throttled_peak: int | None = None
    #: Served calls that ended in the interval (what ``busy_ms`` was spent on).
    served: int = 0
    #: The share of the limit the classes that asked can fill: the largest of their class
    #: shares (at most 1), since a class ceiling counts the whole pool's in-flight. A pool
    #: only 0.4- and 0.3-share classes use is full at 0.4 of its limit.
    reach: float = 1.0

    @property
    def wanted(self) -> float:
        """Concurrency callers wanted: in flight, plus what the refused calls would have used.

        A refusal is a call, not a slot: refused calls x the mean call length / the window
        is the concurrency they would have held (every refusal counts as one slot when no
        call length is known).
        """
        if self.served > 0 and self.span_ms > 0:
            extra = self.demand * (self.busy_ms / self.served) / self.span_ms
        else:
            extra = float(self.demand)
        return self.peak_in_flight + extra

    @property
    def granted(self) -> float | None:
        """Concurrency Bedrock served on average over the interval (Little's law).

        A lower bound: the calls that ended in the interval began up to a call's length
        before it, so their time is spread over the interval plus a mean call (in a steady
        state that reads low by span / (span + call); right after a cut, when those calls
        ran at the old, higher level, it still does not read high). None when the interval
        is shorter than a served call: the calls that ended in it ran mostly before it.
        """
        if self.span_ms <= 0:
            return None
        mean = self.busy_ms / self.served if self.served > 0 else 0.0
        if self.span_ms < mean:
            return None
        return self.busy_ms / (self.span_ms + mean)

    def quota_estimate(self) -> int | None:
        """The concurrency Bedrock refused at in this interval (None: it did not throttle).

        Bedrock throttled while the fleet had about ``throttled_peak`` calls in flight, the
        refused one among them: it grants one less. The count is sampled once per tick, so
        it can read low; what Bedrock did serve on average (:attr:`granted`) bounds it
        from below.
        """
        if self.throttles <= 0:
            return None
        at = self.throttled_peak if self.throttled_peak is not None else self.peak_in_flight
        served = math.floor(self.granted or 0.0)
        return max(1, at - 1, served)


#: Admission refusals (as named in RateLimit-Policy) that more pool concurrency would serve.
_CONCURRENCY_LIMITS: Final = ('"pool.concurrency"', '"class.concurrency"')


def for_concurrency(headers: Mapping[str, str], message: str) -> bool:
    """Was an admission refusal for want of a pool slot (its own share, or the queue)?"""
    named = headers.get("RateLimit-Policy", "")
    return named.startswith(_CONCURRENCY_LIMITS) or "are waiting for model pool" in message


def bounds(cfg: Adaptive, configured: int | None) -> tuple[int, int]:
    """(floor, ceiling): the ceiling is capped by the configured concurrency, the floor by it."""
    ceiling = cfg.ceiling if configured is None else min(cfg.ceiling, configured)
    return min(cfg.floor, ceiling), ceiling


def start_limit(cfg: Adaptive, configured: int | None) -> int:
    """Where the limit starts: ``cfg.initial``, else the configured concurrency, in bounds."""
    floor, ceiling = bounds(cfg, configured)
    return max(floor, min(ceiling, cfg.initial or configured or ceiling))


def demanded(stats: IntervalStats, current: int) -> bool:
    """Did callers want about ``current`` or more? (An idle pool proves nothing about more.)

    What they wanted is what was in flight plus what was refused for want of a slot; a
    few refusals left over from a lower limit do not make a pool grow that has room.
    """
    return stats.wanted >= math.ceil(BUSY_FRACTION * current)


def cut(current: int, cfg: Adaptive, learned: int | None, throttled: float = 0.0) -> int:
    """The limit after a throttled interval (before the floor is applied).

    At least ``decrease``; further when both of Bedrock's answers say the quota is lower
    (a cut): the level it throttled at (``learned``) and the share it served
    (1 - ``throttled``) of the limit. The larger of the two is trusted, since a sampled
    in-flight can read low; one step never cuts more than :data:`MAX_CUT`.
    """
    new = min(current - 1, int(current * cfg.decrease))
    if learned is None:
        return new
    served = max(learned, current * (1.0 - throttled))
    return min(new, max(int(SETTLE * served), int(current * MAX_CUT)))


def next_limit(
    current: int,
    stats: IntervalStats,
    cfg: Adaptive,
    configured: int | None,
    learned: int | None = None,
    *,
    known: int | None = None,
    breaker: int = CLOSED,
) -> tuple[int, str]:
    """The limit for the next interval and why; the result is always within :func:`bounds`.

    ``learned`` is the fresh quota estimate (growth stops there), ``known`` the last one
    ever made (None: Bedrock never throttled, so slow start); ``breaker`` the pool's
    breaker state: open holds the limit at or above the last quota learned (below it,
    grows back additively), half-open grows additively only.
    """
    floor, ceiling = bounds(cfg, configured)
    known = learned if known is None else known
    if current > ceiling:
        return ceiling, f"above ceiling {ceiling}"
    if current < floor:
        return floor, f"below floor {floor}"
    if stats.throttles > 0:
        est = "" if learned is None else f", Bedrock throttled at ~{learned}"
        share = stats.throttles / stats.requests if stats.requests else 0.0
        return max(floor, cut(current, cfg, learned, share)), (
            f"{stats.throttles}/{stats.requests} throttled{est}"
        )
    stop = learned if learned is not None else _probe_cap(known, breaker)
    hold = _hold_reason(current, stats, cfg, ceiling, stop, breaker)
    if hold is not None:
        return current, hold
    why = f"wanted {stats.wanted:.0f} ({stats.demand} refused), no throttles"
    if stop is not None:
        return min(ceiling, current + cfg.increase, stop), f"additive toward {stop}: {why}"
    if known is None and breaker == CLOSED:
        return min(ceiling, 2 * current), f"slow start: {why}"
    return _probe(current, stats, cfg, ceiling, known, why)


def _probe(
    current: int, stats: IntervalStats, cfg: Adaptive, ceiling: int, known: int | None, why: str
) -> tuple[int, str]:
    """Growth above a quota learned earlier that is no longer fresh (or with none known
    while the breaker is not closed).

    One slot above the old quota first, then twice as far above it as the limit already
    is: each clean step is evidence of a raise. On a concurrency quota an overshoot costs
    about one throttle (the reflex lowers the limit to what is in flight at the first); on
    a per-minute quota Bedrock's burst hides it for a while, and the law's cut answers it.
    """
    if known is not None and current < known:  # additive back up to the old quota first
        return min(ceiling, current + cfg.increase, known), f"additive toward {known}: {why}"
    if known is not None and current > known and not _filled(stats, current):
        # Refused demand alone (a class share, say) proves nothing above the old quota:
        # only calls Bedrock served at this level without a throttle do. Growing on
        # without them left the limit at 2.6x a cut quota, thrown at Bedrock at once
        # when demand rose (sweep seed 1).
        peak = stats.peak_in_flight
        return current, f"probing above {known}: holding at {current} until calls fill it ({peak})"
    step = cfg.increase if known is None else max(1, current - known)
    return min(ceiling, current + step), f"probing above {known}: {why}"


def _filled(stats: IntervalStats, current: int) -> bool:
    """Did the calls in flight reach (about) what the classes that asked can hold of
    ``current`` (all of it once a class with share 1 asks), Bedrock throttling none?"""
    return stats.peak_in_flight >= math.ceil(BUSY_FRACTION * stats.reach * current)


def _probe_cap(known: int | None, breaker: int) -> int | None:
    """Half-open recovers up to the last quota learned; probing above it waits for closed."""
    return known if breaker != CLOSED else None


def _hold_reason(
    current: int,
    stats: IntervalStats,
    cfg: Adaptive,
    ceiling: int,
    learned: int | None,
    breaker: int,
) -> str | None:
    if breaker == OPEN and (learned is None or current >= learned):
        # Below the quota Bedrock was last seen to grant, the cut limit only starves the
        # classes admission serves first: grow back toward it (never above it) while open.
        return "breaker open: holding the cut limit"
    if stats.p99_ms is None and stats.demand == 0:
        return "no requests"
    if stats.p99_ms is not None and stats.p99_ms >= cfg.target_p99_ms:
        return f"p99 {stats.p99_ms:.0f} ms >= target {cfg.target_p99_ms:.0f} ms"
    if not demanded(stats, current):
        return f"callers wanted ~{stats.wanted:.0f} of limit {current}"
    if current >= ceiling:
        return f"at ceiling {ceiling}"
    if learned is not None and current >= learned:
        return f"holding at {current}: Bedrock throttled at ~{learned} recently"
    return None


class LearnedQuota:
    """Per pool, the concurrency Bedrock throttled at in its latest throttled moment.

    Re-estimated from every throttle (the latest replaces the earlier, so a quota cut is
    learned at once), fresh until :data:`PROBE_CALLS` calls went by (and at least
    :data:`MIN_FRESH_INTERVALS`, at most :data:`LEARN_INTERVALS`); the last estimate is kept as
    ``known`` so growth after it expires probes rather than doubling. Given the fleet's
    latest throttled bucket (``throttled_at``), every instance learns the same value from
    it: the leader of any interval then holds growth where the fleet last saw Bedrock
    throttle, instead of probing above a quota only the instance that cut has learned.
    """

    def __init__(self) -> None:
        #: Per pool: [estimate, when it was made, upstream calls since].
        self._seen: dict[str, list[float]] = {}
        self._bucket: dict[str, tuple[int, int]] = {}
        self._counted: dict[str, int] = {}

    def count_calls(self, pool: str, tick: PoolTick) -> int:
        """Upstream calls of ``pool`` in the fleet buckets completed since the last count."""
        after = self._counted.get(pool)
        calls, newest = tick.finished_requests(after)
        self._counted[pool] = newest
        return calls

    def update(
        self,
        pool: str,
        stats: IntervalStats,
        interval_s: float,
        now: float | None = None,
        *,
        throttled_at: tuple[int, int] | None = None,
        calls: int = 0,
    ) -> int | None:
        """Take one interval's fleet stats (and the fleet's latest throttled bucket and its
        in-flight, and the upstream calls since the last update); return the fresh estimate
        (None: none fresh): for :data:`MIN_FRESH_INTERVALS` and :data:`PROBE_CALLS` calls,
        or :data:`LEARN_INTERVALS` at most."""
        now = time.monotonic() if now is None else now
        estimate = stats.quota_estimate() if throttled_at is None else None
        last = self._bucket.get(pool, (-1, 0))
        if throttled_at is not None and throttled_at[0] >= last[0] and throttled_at != last:
            # The fleet's latest throttled bucket, the same for every instance (its own
            # window, since the limit change it saw, is not: never mix the two). Learned
            # once per bucket (or again when its level changed), so the estimate's age
            # and its calls count from the throttle, not from the last tick that saw it.
            self._bucket[pool] = throttled_at
            estimate = max(1, throttled_at[1] - 1, math.floor(stats.granted or 0.0))
        if estimate is not None:
            self._seen[pool] = [estimate, now, 0]
            calls = 0  # calls of this tick ran before (or at) the throttle
        kept = self._seen.get(pool)
        if kept is None:
            return None
        kept[2] += calls
        age = (now - kept[1]) / interval_s
        probed = kept[2] >= PROBE_CALLS and age >= MIN_FRESH_INTERVALS
        return None if probed or age >= LEARN_INTERVALS else int(kept[0])

    def known(self, pool: str) -> int | None:
        """The last estimate made for ``pool``, fresh or not (None: never throttled)."""
        kept = self._seen.get(pool)
        return None if kept is None else int(kept[0])


def underutilised(
    limit: int,
    stats: IntervalStats,
    cfg: Adaptive,
    configured: int | None,
    next_value: int | None = None,
    learned: int | None = None,
) -> bool:
    """The alarm of incident 3: capacity is being left unused.

    Either at the ceiling with traffic, no throttles and p99 under half the target, or
    refused demand while the limit is stuck below its ceiling (``next_value`` is where the
    law moves it; equal to ``limit`` means stuck) without Bedrock throttling and below the
    quota Bedrock was last seen to grant (at it, Bedrock's quota binds, not Sluice).
    """
    ceiling = bounds(cfg, configured)[1]
    if stats.throttles > 0:
        return False
    if limit < ceiling:
        at_quota = learned is not None and limit >= learned
        stuck = next_value is not None and next_value <= limit
        return stats.demand > 0 and stuck and not at_quota
    return stats.requests > 0 and stats.p99_ms is not None and stats.p99_ms < cfg.target_p99_ms / 2


def interval_stats(
    t: PoolTick, interval_s: float, since: int | None, tick_s: float, shares: Mapping[str, float]
) -> IntervalStats:
    """A pool's fleet outcomes over its interval (after the last limit change, ``since``);
    ``shares`` are the classes' shares of a pool limit."""
    # Only outcomes under the limit in force count: throttles of calls admitted before a
    # cut (and refusals before a raise) would move it again for what it already fixed.
    w = t.window(interval_s, since_ms=since)
    # Demand over one tick more: a leader change can skip a tick (throttles seen twice
    # would cut twice, refusals seen twice only confirm the demand).
    wide = t.window(interval_s + tick_s, since_ms=since)
    total = w.total
    return IntervalStats(
        total.requests,
        total.throttles,
        total.p99_ms,
        wide.peak_in_flight,
        wide.total.demand,
        float(total.busy_ms),
        float(w.span_ms),
        w.throttled_peak,
        total.requests - total.failures,
        # A class ceiling counts the pool's whole in-flight, not the class's own, so the
        # classes that asked reach no further together than the largest share among them.
        min(
            1.0,
            max(
                (shares.get(c, 1.0) for c, n in wide.by_class.items() if n.requests or n.demand),
                default=1.0,
            ),
        ),
    )
