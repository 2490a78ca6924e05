"""The fleet's time buckets as one tick reads them back: windows, latency histograms, ticks.

Latency is kept as a histogram with fixed log-spaced buckets so p99 merges across
instances, pools and classes. :mod:`proxy.control.fleet` fills the buckets;
:mod:`proxy.control.exchange` moves them to and from Redis (or keeps them in process).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from proxy.control.breaker import BreakerRecord

#: Latency bucket j holds (BASE^(j-1), BASE^j] ms; bucket 0 holds everything up to 1 ms.
BASE: Final = 1.25
N_BUCKETS: Final = 60  # 1.25^59 ms ≈ 8.7 min: longer than any Bedrock call may run
_LOG_BASE: Final = math.log(BASE)
#: The per-class counters of a bucket, in the order a window row holds them.
_KINDS: Final = "nteds"


def bucket_index(latency_ms: float) -> int:
    """The latency bucket of ``latency_ms`` (see :data:`BASE`)."""
    if latency_ms <= 1.0:
        return 0
    return min(N_BUCKETS - 1, math.ceil(math.log(latency_ms) / _LOG_BASE - 1e-9))


def _upper_bound(j: int) -> float:
    """The largest latency (ms) :func:`bucket_index` puts in a bucket at most ``j``."""
    lo, hi = 0, 0x7FEFFFFFFFFFFFFF  # the bit patterns of 0.0 and the largest finite float
    while lo < hi:  # positive floats order as their bit patterns do
        mid = (lo + hi + 1) // 2
        if bucket_index(_as_float(mid)) <= j:
            lo = mid
        else:
            hi = mid - 1
    return _as_float(lo)


def _as_float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<Q", bits))[0])


#: ``bisect_left(BUCKET_BOUNDS_MS, ms) == bucket_index(ms)`` for every latency: one C call
#: for the request path instead of a Python frame with a log.
BUCKET_BOUNDS_MS: Final = tuple(_upper_bound(j) for j in range(N_BUCKETS - 1))


def quantile_ms(hist: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of a latency histogram, log-interpolated inside its bucket."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for j, count in enumerate(hist):
        if count and seen + count >= rank:
            if j == 0:
                return 1.0
            frac = (rank - seen) / count
            return float(BASE ** (j - 1 + frac))
        seen += count
    return float(BASE ** (N_BUCKETS - 1))


@dataclass(frozen=True, slots=True)
class Window:
    """Fleet counts over a window: requests, throttles, 5xx and the latency histogram.

    ``demand`` counts calls Sluice refused (or gave up queueing) for concurrency, which
    never reach Bedrock; ``busy_ms`` is the time Bedrock spent on calls it served, whose
    rate over the window is the concurrency Bedrock granted (Little's law).
    """

    requests: int = 0
    throttles: int = 0
    errors: int = 0
    hist: tuple[int, ...] = (0,) * N_BUCKETS
    demand: int = 0
    busy_ms: int = 0

    @property
    def failures(self) -> int:
        """Throttles plus 5xx: what the breaker counts."""
        return self.throttles + self.errors

    @property
    def p99_ms(self) -> float | None:
        """p99 latency in ms (None without requests)."""
        return quantile_ms(self.hist, 0.99)

    def __add__(self, other: Window) -> Window:
        return Window(
            self.requests + other.requests,
            self.throttles + other.throttles,
            self.errors + other.errors,
            tuple(a + b for a, b in zip(self.hist, other.hist, strict=True)),
            self.demand + other.demand,
            self.busy_ms + other.busy_ms,
        )


def throttled_level(fields: Mapping[str, int]) -> int | None:
    """The fleet in-flight of a bucket in which Bedrock throttled (None: it did not).

    Read at the throttle itself (``q``, by the reflex) where one was; otherwise the peak
    sampled once per tick (``p``), which can only read low.
    """
    if fields.get("q", 0) > 0:
        return fields["q"]
    p = fields.get("p", 0)
    if p > 0 and any(v and k.startswith("t|") for k, v in fields.items()):
        return p
    return None


@dataclass(frozen=True, slots=True)
class PoolWindow:
    """A pool's fleet window: all classes, each class, and the peak in-flight sampled."""

    total: Window
    by_class: Mapping[str, Window]
    peak_in_flight: int
    #: How much time the window's data covers (its last bucket is still filling).
    span_ms: int = 0
    #: The highest in-flight of a bucket in which Bedrock throttled (None: none did), as
    #: :func:`throttled_level` reads it.
    throttled_peak: int | None = None


@dataclass(frozen=True, slots=True)
class PoolTick:
    """What one tick learned about a pool (times are Redis server ms, or local in embedded)."""

    now_ms: int
    bucket_ms: int
    in_flight: int
    #: The fleet's dynamic concurrency limit in the store (None: not set).
    fleet_limit: int | None
    #: This instance holds the controller's leadership for the current interval.
    leader: bool
    probe_granted: bool
    breaker: BreakerRecord
    #: (bucket number, fields) of the recent buckets, oldest bucket not guaranteed first.
    rows: tuple[tuple[int, Mapping[str, int]], ...]
    #: When the fleet limit was last changed (fleet ms; None: not known).
    limit_ms: int | None = None

    def latest_throttle(self, seconds: float) -> tuple[int, int] | None:
        """(bucket, in-flight as :func:`throttled_level` reads it) of the newest bucket of
        the last ``seconds`` in which Bedrock throttled (None: none did). Every instance
        reads the same fleet buckets, so every instance finds the same one, whichever limit
        change it saw last."""
        cur = self.now_ms // self.bucket_ms
        first = cur - max(1, math.ceil(seconds * 1000 / self.bucket_ms)) + 1
        found: tuple[int, int] | None = None
        for b, fields in self.rows:
            if not first <= b <= cur or (found is not None and b < found[0]):
                continue
            level = throttled_level(fields)
            if level is not None:
                found = (b, level)
        return found

    def finished_requests(self, after: int | None) -> tuple[int, int]:
        """(upstream calls in the complete buckets after bucket ``after``, the newest
        complete bucket); with ``after`` None, none are counted yet."""
        newest = self.now_ms // self.bucket_ms - 1
        if after is None:
            return 0, newest
        calls = sum(
            v
            for b, fields in self.rows
            if after < b <= newest
            for k, v in fields.items()
            if k.startswith("n|")
        )
        return calls, max(after, newest)

    def window(self, seconds: float, *, since_ms: int | None = None) -> PoolWindow:
        """Fleet counts of the buckets overlapping the last ``seconds`` (and after ``since_ms``)."""
        cur = self.now_ms // self.bucket_ms
        first = cur - max(1, math.ceil(seconds * 1000 / self.bucket_ms)) + 1
        if since_ms is not None:
            # The bucket holding since_ms mixes outcomes from before it: leave it out.
            first = max(first, since_ms // self.bucket_ms + 1)
        acc: dict[str, list[int]] = {}
        peak, oldest, at_throttle = 0, cur, None
        for b, fields in self.rows:
            if not first <= b <= cur:
                continue
            oldest = min(oldest, b)
            level = throttled_level(fields)
            if level is not None:
                at_throttle = level if at_throttle is None else max(at_throttle, level)
            for name, value in fields.items():
                kind, _, cls = name.partition("|")
                if not cls:
                    if kind == "p":
                        peak = max(peak, value)
                    continue
                row = acc.get(cls)
                if row is None:
                    row = acc[cls] = [0] * (5 + N_BUCKETS)
                if kind[0] == "h":
                    row[5 + int(kind[1:])] += value
                else:
                    row[_KINDS.index(kind)] += value
        by_class = {c: Window(r[0], r[1], r[2], tuple(r[5:]), r[3], r[4]) for c, r in acc.items()}
        # From the oldest bucket holding anything: a fleet that just started has no history.
        span = (cur - oldest) * self.bucket_ms + self.now_ms % self.bucket_ms
        total = sum(by_class.values(), Window())
        return PoolWindow(total, by_class, peak, max(1, span), at_throttle)


@dataclass(frozen=True, slots=True)
class PoolControl:
    """What an instance asks of the fleet about a pool this tick, besides its counts."""

    #: Claim the controller's leadership for this many ms (0: the pool is not adaptive).
    leader_px: int = 0
    probe_op: int = 0
    breaker_gen: int = 0
    probe_cap: int = 0
    probes_ok: int = 0
    probes_failed: int = 0
