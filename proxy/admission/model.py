"""The admission decision as data and pure arithmetic, apart from any I/O.

Everything here is mirrored line for line by ``scripts/admit.lua`` and
``scripts/settle.lua``: the embedded store runs these functions directly, the Redis
store runs the Lua, and the same behavioural suite checks both agree.

Buckets are stored as a *theoretical arrival time* (TAT, GCRA-style): one float in
milliseconds. The level at ``now`` is ``burst - max(0, tat - now) * rate``; the
bucket is full when ``tat <= now``, and a level below zero is debt. One number per
bucket means a denial writes nothing and an idle bucket's key may simply expire.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Final, NamedTuple

# The key layout lives in proxy.backend.keys; these names stay importable from here.
from proxy.backend.keys import KEY_PREFIX as KEY_PREFIX
from proxy.backend.keys import TIER_SCOPE as TIER_SCOPE
from proxy.backend.keys import PlanKeys as PlanKeys
from proxy.backend.keys import plan_keys as plan_keys
from proxy.backend.keys import scope_name as scope_name

#: Limit names, indexed by the integer code the scripts return (0 = none).
LIMIT_NAMES: Final[tuple[str | None, ...]] = (
    None,
    "pool.requests_per_minute",  # 1
    "pool.tokens_per_minute",  # 2
    "pool.concurrency",  # 3
    "class.requests_per_minute",  # 4
    "class.tokens_per_minute",  # 5
    "class.concurrency",  # 6
    "workload.requests_per_minute",  # 7
    "workload.tokens_per_minute",  # 8
    "workload.concurrency",  # 9
    "pool.queue",  # 10: the limits have room, but requests ahead of this one wait for it
)
POOL_RPM, POOL_TPM, POOL_CONC, CLASS_RPM, CLASS_TPM, CLASS_CONC = 1, 2, 3, 4, 5, 6
WL_RPM, WL_TPM, WL_CONC = 7, 8, 9
QUEUE = 10

#: Float slack so that ``level - cost`` landing exactly on a floor is not refused.
EPS: Final = 1e-6
#: A grant that leaves at most this many slots (or this share of the limit) of a concurrency
#: limit is "tight": its release is confirmed before the caller gets the answer, so the
#: caller's next request cannot find its own finished call still holding a slot.
TIGHT_ROOM: Final = 2
TIGHT_SHARE: Final = 0.1
#: Bounds of the concurrency retry hint: a slot may free up any moment (a settle).
CONC_RETRY_MIN_MS: Final = 50
CONC_RETRY_MAX_MS: Final = 1000
#: Retry hints are capped so a bucket with a tiny rate cannot produce absurd numbers.
RETRY_CAP_MS: Final = 86_400_000
#: Retry hint of a ``pool.queue`` refusal: the waiter ahead is usually served within one release.
QUEUE_RETRY_MS: Final = 200
#: A waiter's fleet-wide score is ``rank * RANK_SPAN + arrival``, where arrival is the pool's
#: waiter sequence number (drawn by the store, so FIFO across instances is exact): ordered
#: by rank, then arrival, exactly representable in a double for ranks <= MAX_RANK.
RANK_SPAN: Final = 1 << 42
MAX_RANK: Final = 1023
#: A waiter entry outlives its deadline by this much before any admit may reap it (covers
#: the round trip of its own withdrawal); a killed instance's waiters vanish after that.
WAITER_GRACE_MS: Final = 1000
#: Waiters reaped per script call at most (bounds the script's run time).
REAP_MAX: Final = 64
#: Wait verdicts: refuse now; wait registered in the fleet queue; wait without blocking others.
WAIT_NO, WAIT_FLEET, WAIT_LOCAL = 0, 1, 2
#: Refusals whose retry hint is exact (a bucket refills on schedule); the others
#: (concurrency, queue) may clear with any release, so their hint is only a guess.
EXACT_CODES: Final = frozenset((POOL_RPM, POOL_TPM, CLASS_RPM, CLASS_TPM, WL_RPM, WL_TPM))


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket: continuous refill at ``rate_per_s`` up to ``burst``."""

    rate_per_s: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ValueError(f"bucket rate_per_s must be a positive number, got {self.rate_per_s}")
        if not (self.burst > 0 and math.isfinite(self.burst)):
            raise ValueError(f"bucket burst must be a positive number, got {self.burst}")


class Params(NamedTuple):
    """A plan's numbers in the order the Lua scripts read them (absent bucket: burst 0)."""

    share: float
    p_rrate: float  # per millisecond
    p_rburst: float
    p_trate: float
    p_tburst: float
    p_conc: int  # -1 = no configured limit
    w_rrate: float
    w_rburst: float
    w_trate: float
    w_tburst: float
    w_conc: int
    ttl_ms: int


def _bucket_params(b: Bucket | None) -> tuple[float, float]:
    return (0.0, 0.0) if b is None else (b.rate_per_s / 1000.0, float(b.burst))


@dataclass(frozen=True, slots=True)
class AdmitPlan:
    """Every limit that applies to one (workload, pool) at one priority, fixed at policy load.

    Key names, the scripts' static argument and the header quotas are computed once
    here so the request path only adds the token count and a lease id.
    """

    pool: str
    workload: str
    priority: str
    share: float
    pool_requests: Bucket | None
    pool_tokens: Bucket | None
    pool_concurrency: int | None
    workload_requests: Bucket | None
    workload_tokens: Bucket | None
    workload_concurrency: int | None
    lease_ttl_ms: int = 30000
    params: Params = field(init=False, repr=False, compare=False)
    keys: PlanKeys = field(init=False, repr=False, compare=False)
    #: ``params`` packed as the scripts read them (``struct.unpack('<12d')`` in Lua).
    arg: bytes = field(init=False, repr=False, compare=False)
    #: Priority rank for waiting: 0 is served first; equal ranks are served in arrival order.
    rank: int = 0
    #: The service tier whose own quota the pool limits are (None: the pool's own quota).
    tier: str | None = None
    #: Grants may be held ahead of demand for this plan (:mod:`proxy.backend.ahead`). False
    #: on a pool with adaptive concurrency (its control law and throttle reflex read its
    #: in-flight count, which unused grants would inflate) and for a retry's slot-only plan.
    hold_ahead: bool = True
    #: Where the pool-level state lives: :func:`scope_name` of pool and tier. Stores key
    #: everything (buckets, leases, waiters, batches) by scope, so a tier's own quota is
    #: decided by the same one atomic script, apart from the pool's.
    scope: str = field(init=False, repr=False, compare=False)
    #: No limit applies, so admission can skip the store entirely (read on every request).
    unmetered: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"priority share must be in (0, 1], got {self.share}")
        for part in (self.pool, self.tier or ""):
            if "{" in part or "}" in part or ":" in part:
                raise ValueError(f"pool and tier names must not contain braces or colons: {part!r}")
        if not 0 <= self.rank <= MAX_RANK:
            raise ValueError(f"rank must be in [0, {MAX_RANK}], got {self.rank}")
        if self.lease_ttl_ms < 100:
            raise ValueError(f"lease_ttl_ms must be >= 100, got {self.lease_ttl_ms}")
        for name in ("pool_concurrency", "workload_concurrency"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        p = Params(
            float(self.share),
            *_bucket_params(self.pool_requests),
            *_bucket_params(self.pool_tokens),
            -1 if self.pool_concurrency is None else int(self.pool_concurrency),
            *_bucket_params(self.workload_requests),
            *_bucket_params(self.workload_tokens),
            -1 if self.workload_concurrency is None else int(self.workload_concurrency),
            int(self.lease_ttl_ms),
        )
        object.__setattr__(self, "params", p)
        object.__setattr__(self, "scope", scope_name(self.pool, self.tier))
        pool_limits = (self.pool_requests, self.pool_tokens, self.pool_concurrency)
        wl_limits = (self.workload_requests, self.workload_tokens, self.workload_concurrency)
        unmetered = all(limit is None for limit in (*pool_limits, *wl_limits))
        object.__setattr__(self, "unmetered", unmetered)
        object.__setattr__(self, "keys", plan_keys(self.scope, self.workload))
        # Packed doubles: Lua reads the very same numbers, and unpacking is one C call
        # where parsing text would cost more than the rest of the decision.
        object.__setattr__(self, "arg", struct.pack("<12d", *p))


@dataclass(slots=True)
class Decision:
    """The answer to one admission; the header fields describe the tightest limit."""

    admitted: bool
    lease: str | None
    refused_by: str | None
    retry_after_ms: int
    binding: str | None
    limit: float
    remaining: float
    reset_ms: int
    remaining_requests: int | None
    remaining_tokens: int | None
    #: Admitted with a concurrency limit nearly full (see :data:`TIGHT_ROOM`).
    tight: bool = False


# --- bucket arithmetic (mirrored in admit.lua / settle.lua) ------------------------------


def level(tat: float, now: float, rate: float, burst: float) -> float:
    """Bucket level at ``now`` (ms); negative is debt. ``rate`` is per millisecond."""
    return burst - max(0.0, tat - now) * rate


def needed_level(cost: float, burst: float, share: float) -> float:
    """Level a bucket must have for ``cost`` to pass while keeping ``(1-share)*burst`` back.

    A cost above the class's allowance only passes on a full bucket, so big requests
    still progress (leaving debt) instead of starving.
    """
    allowance = share * burst
    return burst if cost > allowance + EPS else cost + (burst - allowance)


def bucket_verdict(lvl: float, cost: float, burst: float, share: float) -> int:
    """0 = passes, 1 = refused only by the class floor, 2 = refused by the bucket itself."""
    if lvl >= needed_level(cost, burst, share) - EPS:
        return 0
    return 2 if lvl < needed_level(cost, burst, 1.0) - EPS else 1


def take(tat: float, now: float, cost: float, rate: float) -> float:
    """TAT after admitting ``cost``."""
    return max(tat, now) + cost / rate


def refund(tat: float, now: float, amount: float, rate: float) -> float:
    """TAT after giving back ``amount`` (negative = extra debt); never above a full bucket."""
    return max(max(tat, now) - amount / rate, now)


def bucket_wait_ms(lvl: float, need: float, rate: float) -> float:
    """Milliseconds until a bucket at ``lvl`` refills to ``need``."""
    return (need - lvl) / rate


def class_limit(limit: int, share: float) -> int:
    """The in-flight ceiling of a class with ``share`` of a pool limit."""
    return math.ceil(share * limit - 1e-9)


def conc_verdict(in_flight: int, limit: int, share: float) -> int:
    """0 = one more fits, 1 = refused by the class ceiling, 2 = refused by the pool limit."""
    if in_flight + 1 > limit:
        return 2
    return 1 if in_flight + 1 > class_limit(limit, share) else 0


def effective_limit(configured: int, dynamic: int | None) -> int:
    """Pool concurrency in force: the lower of configured and dynamic; -1 = unlimited."""
    if dynamic is None:
        return configured
    return dynamic if configured < 0 else min(configured, dynamic)


def conc_wait_ms(earliest_expiry: float | None, now: float) -> float:
    """Retry hint for a full concurrency limit: until the earliest lease expires, clamped."""
    wait = CONC_RETRY_MAX_MS if earliest_expiry is None else earliest_expiry - now
    return min(max(wait, CONC_RETRY_MIN_MS), CONC_RETRY_MAX_MS)


def retry_ms(wait: float) -> int:
    """A wait in ms as the integer hint callers get: at least 1, capped."""
    return int(min(max(math.ceil(wait), 1), RETRY_CAP_MS))


class PoolView(NamedTuple):
    """What a decision reads of one pool and one workload (TATs, in-flight counts)."""

    p_rtat: float
    p_ttat: float
    p_in: int
    p_limit: int  # effective pool concurrency, -1 = none
    w_rtat: float
    w_ttat: float
    w_in: int


def evaluate(
    p: Params,
    tokens: float,
    now: float,
    v: PoolView,
    p_earliest: float | None,
    w_earliest: float | None,
) -> tuple[int, float]:
    """Check every limit of a plan at once: ``(0, 0)`` or ``(refusing code, wait ms)``.

    When several limits refuse, the one with the longest wait is named, so the retry
    hint is when *all* of them will have room. Nothing is changed here.
    """
    worst, wait = _pool_refusal(p, tokens, now, v, p_earliest)
    code, w = _workload_refusal(p, tokens, now, v, w_earliest)
    if w > wait:  # on a tie the pool's limit is named, as admit.lua does
        worst, wait = code, w
    return worst, max(wait, 0.0)


def _bucket_wait(
    tat: float, now: float, rate: float, burst: float, cost: float, share: float
) -> tuple[int, float]:
    """A bucket's verdict (0 room, 1 class share out, 2 bucket out) and the wait for room."""
    lvl = level(tat, now, rate, burst)
    verdict = bucket_verdict(lvl, cost, burst, share)
    if not verdict:
        return 0, -1.0
    return verdict, bucket_wait_ms(lvl, needed_level(cost, burst, share), rate)


def _pool_refusal(
    p: Params, tokens: float, now: float, v: PoolView, earliest: float | None
) -> tuple[int, float]:
    """The pool's (and the class's share of it) longest-waiting refusal: (code, ms) or (0, -1)."""
    worst, wait = 0, -1.0
    for code, tat, rate, burst, cost in (
        (POOL_RPM, v.p_rtat, p.p_rrate, p.p_rburst, 1.0),
        (POOL_TPM, v.p_ttat, p.p_trate, p.p_tburst, tokens),
    ):
        if burst > 0:
            verdict, w = _bucket_wait(tat, now, rate, burst, cost, p.share)
            if verdict and w > wait:
                worst, wait = (code if verdict == 2 else code + 3), w
    if v.p_limit >= 0:
        verdict = conc_verdict(v.p_in, v.p_limit, p.share)
        w = conc_wait_ms(earliest, now) if verdict else -1.0
        if verdict and w > wait:
            worst, wait = (POOL_CONC if verdict == 2 else CLASS_CONC), w
    return worst, wait


def _workload_refusal(
    p: Params, tokens: float, now: float, v: PoolView, earliest: float | None
) -> tuple[int, float]:
    """The workload's longest-waiting refusal: (code, ms) or (0, -1)."""
    worst, wait = 0, -1.0
    for code, tat, rate, burst, cost in (
        (WL_RPM, v.w_rtat, p.w_rrate, p.w_rburst, 1.0),
        (WL_TPM, v.w_ttat, p.w_trate, p.w_tburst, tokens),
    ):
        if burst > 0:
            verdict, w = _bucket_wait(tat, now, rate, burst, cost, 1.0)
            if verdict and w > wait:
                worst, wait = code, w
    if p.w_conc >= 0 and v.w_in + 1 > p.w_conc:
        w = conc_wait_ms(earliest, now)
        if w > wait:
            worst, wait = WL_CONC, w
    return worst, wait
