"""Fleet observations: every instance's upstream outcomes, merged into one view per pool.

The request path calls :meth:`FleetStats.observe` (sync, in memory) once per finished
upstream call. Once per tick each instance sends its window to Redis and reads back the
fleet's recent buckets in one round trip: one ``EVALSHA`` of :data:`TICK_LUA` per pool,
pipelined on one Redis, sent concurrently on a Cluster (redis-py refuses scripts in
cluster pipelines; each pool is one slot, so each call is one master's round trip).
Latency is kept as a histogram with fixed log-spaced buckets so p99 merges across
instances, pools and classes. The windows and ticks read back are in
:mod:`proxy.control.window`, the round trip itself in :mod:`proxy.control.exchange`.

Key layout (all keys of a pool share the hash tag ``{<pool>}``, one slot per pool)::

    sluice:{<pool>}:fleet:<i>   hash  ring of time buckets: b = bucket number,
                                      p = peak fleet in-flight sampled in the bucket,
                                      q = lowest fleet in-flight read when Bedrock
                                      throttled (by the reflex),
                                      n|<class>, t|<class>, e|<class>, h<j>|<class> = requests,
                                      throttles, 5xx and latency-bucket-j counts,
                                      d|<class> = calls refused for concurrency (demand),
                                      s|<class> = ms spent in calls Bedrock answered 200
    sluice:{<pool>}:breaker     hash  the breaker record (see :mod:`proxy.control.breaker`)
    sluice:{<pool>}:leader      str   the controller's leader for the current interval
    sluice:{<pool>}:pool, :leases     the store's dynamic limit (``lim``, written here
                                      with its change time ``lim_ms``) and leases

A ring key is reset when its slot is reused and expires after one ring turn, so a dead
instance's counts age out with the buckets they went into. Time is Redis ``TIME``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from proxy.admission import Store
from proxy.control.breaker import BreakerRecord
from proxy.control.exchange import (
    BREAKER_TTL_MS,
    TICK_LUA,
    Exchange,
    FleetUnavailable,
    LimitSet,
    LocalExchange,
    RedisExchange,
    Reflexed,
)
from proxy.control.window import (
    BASE,
    N_BUCKETS,
    PoolControl,
    PoolTick,
    PoolWindow,
    Window,
    bucket_index,
    quantile_ms,
)

__all__ = [
    "BASE",
    "BREAKER_TTL_MS",
    "N_BUCKETS",
    "TICK_LUA",
    "FleetStats",
    "FleetUnavailable",
    "PoolControl",
    "PoolTick",
    "PoolWindow",
    "Window",
    "bucket_index",
    "quantile_ms",
]


class _Acc:
    """This instance's counts for one (pool, class) since the last tick."""

    __slots__ = ("busy_ms", "demand", "errors", "hist", "requests", "throttles")

    def __init__(self) -> None:
        self.requests = self.throttles = self.errors = self.demand = 0
        self.busy_ms = 0.0
        self.hist: dict[int, int] = {}


def _fields(accs: Mapping[str, _Acc]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for cls, a in accs.items():
        out += ((f"n|{cls}", a.requests), (f"t|{cls}", a.throttles), (f"e|{cls}", a.errors))
        out += ((f"d|{cls}", a.demand), (f"s|{cls}", round(a.busy_ms)))
        out += ((f"h{j}|{cls}", c) for j, c in a.hist.items())
    return [(k, v) for k, v in out if v]


class FleetStats:
    """This instance's observations and the fleet's merged view, exchanged once per tick.

    ``observe`` is the only hot-path method; ``exchange`` and ``transition`` are called by
    the runner's background task and raise :class:`FleetUnavailable` on Redis failure.
    """

    def __init__(
        self,
        url: str | None,
        store: Store,
        *,
        instance_id: str,
        longest_window_s: float,
        bucket_s: float = 1.0,
        timeout_s: float = 0.25,
    ) -> None:
        """``longest_window_s`` bounds every later :meth:`PoolTick.window` (the ring size)."""
        bucket_ms = max(1, round(bucket_s * 1000))
        ring = math.ceil(longest_window_s * 1000 / bucket_ms) + 2
        self.bucket_ms = bucket_ms
        self._exchange: Exchange = (
            RedisExchange(url, instance_id, bucket_ms, ring, timeout_s)
            if url
            else LocalExchange(store, bucket_ms, ring)
        )
        self._window: dict[str, dict[str, _Acc]] = {}
        #: Per pool: the lowest fleet in-flight read at a throttle since the last tick.
        self._levels: dict[str, int] = {}

    async def start(self) -> None:
        """Load the scripts (raises :class:`FleetUnavailable` if Redis cannot be reached)."""
        await self._exchange.start()

    async def close(self) -> None:
        """Close the connections."""
        await self._exchange.close()

    def _acc(self, pool: str, priority: str) -> _Acc:
        by_class = self._window.get(pool)
        if by_class is None:
            by_class = self._window[pool] = {}
        acc = by_class.get(priority)
        if acc is None:
            acc = by_class[priority] = _Acc()
        return acc

    def observe(
        self, pool: str, priority: str, latency_ms: float, throttled: bool, server_error: bool
    ) -> None:
        """Count one finished upstream call (in memory; sent with the next tick)."""
        acc = self._acc(pool, priority)
        acc.requests += 1
        acc.throttles += throttled
        acc.errors += server_error
        if not (throttled or server_error):
            acc.busy_ms += latency_ms
        j = bucket_index(latency_ms)
        acc.hist[j] = acc.hist.get(j, 0) + 1

    def observe_latency(self, pool: str, priority: str, latency_ms: float) -> None:
        """A latency sample alone: a call Bedrock did not answer within the read timeout
        (its p99 counts it; the request and failure counts do not)."""
        acc = self._acc(pool, priority)
        j = bucket_index(latency_ms)
        acc.hist[j] = acc.hist.get(j, 0) + 1

    def observe_demand(self, pool: str, priority: str) -> None:
        """Count one call refused for concurrency: demand Bedrock never saw."""
        self._acc(pool, priority).demand += 1

    def observe_level(self, pool: str, in_flight: int) -> None:
        """Record the fleet in-flight read the moment Bedrock throttled (sent as ``q``).

        Calls Bedrock just refused may still hold their leases when it is read, so each
        read bounds Bedrock's in-flight from above: the lowest read is the closest."""
        if in_flight > 0:  # every refused call already gone: says nothing
            self._levels[pool] = min(in_flight, self._levels.get(pool, in_flight))

    async def reflex(
        self, pool: str, lowest: int, lease: str | None = None, others: Sequence[str] = ()
    ) -> Reflexed:
        """Lower the fleet limit of ``pool`` to what is in flight now minus the refused call
        (``lease``: its lease; ``others``: leases of calls Bedrock refused moments before,
        not counted; see :mod:`proxy.control.reflex`); raises :class:`FleetUnavailable`."""
        return await self._exchange.reflex(pool, lowest, lease, others)

    async def set_limit(self, pool: str, expected: int | None, new: int) -> LimitSet:
        """Set the fleet limit of ``pool`` to ``new`` if it is still ``expected`` (None:
        none set); raises :class:`FleetUnavailable`."""
        return await self._exchange.set_limit(pool, expected, new)

    async def exchange(self, controls: Mapping[str, PoolControl]) -> dict[str, PoolTick]:
        """Send this window (then forget it) plus ``controls``; return the fleet view per pool.

        Counts of a failed exchange are dropped, not resent: after a timeout they may have
        been applied, and double counts could open a breaker that should stay closed.
        """
        window, self._window = self._window, {}
        levels, self._levels = self._levels, {}
        sends = {
            pool: (_fields(window.get(pool, {})), control) for pool, control in controls.items()
        }
        for pool in window.keys() - controls.keys():
            sends[pool] = (_fields(window[pool]), PoolControl())
        for pool, level in levels.items():
            if pool in sends:
                sends[pool][0].append(("q", level))
        return await self._exchange.tick(sends)

    async def transition(self, pool: str, gen: int, state: int) -> tuple[bool, BreakerRecord]:
        """Compare-and-set the breaker of ``pool`` from generation ``gen`` to ``state``."""
        return await self._exchange.transition(pool, gen, state)
