"""Fleet observations: every instance's upstream outcomes, merged into one view per pool.

The request path calls :meth:`FleetStats.observe` (sync, in memory) once per finished
upstream call. Once per tick each instance sends its window to Redis and reads back the
fleet's recent buckets in one round trip: one ``EVALSHA`` of :data:`TICK_LUA` per pool,
pipelined on one Redis, sent concurrently on a Cluster (redis-py refuses scripts in
cluster pipelines; each pool is one slot, so each call is one master's round trip).
Latency is kept as a histogram with fixed log-spaced buckets so p99 merges across
instances, pools and classes.

Key layout (all keys of a pool share the hash tag ``{<pool>}``, one slot per pool)::

    sluice:{<pool>}:fleet:<i>   hash  ring of time buckets: b = bucket number,
                                      p = peak fleet in-flight sampled in the bucket,
                                      n|<class>, t|<class>, e|<class>, h<j>|<class> = requests,
                                      throttles, 5xx and latency-bucket-j counts,
                                      d|<class> = calls refused for concurrency (demand),
                                      s|<class> = ms spent in calls Bedrock answered 200
    sluice:{<pool>}:breaker     hash  the breaker record (see :mod:`proxy.control.breaker`)
    sluice:{<pool>}:leader      str   the controller's leader for the current interval
    sluice:{<pool>}:pool, :leases     read only: the store's dynamic limit and leases

A ring key is reset when its slot is reused and expires after one ring turn, so a dead
instance's counts age out with the buckets they went into. Time is Redis ``TIME``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson

from proxy.admission import Store
from proxy.admission.model import plan_keys
from proxy.backend.client import FAILURES, NoScriptError, RedisCluster, redis_client
from proxy.backend.lua import load_script
from proxy.control.breaker import HALF_OPEN, TRANSITION_LUA, BreakerRecord

log = logging.getLogger("sluice.fleet")

#: Latency bucket j holds (BASE^(j-1), BASE^j] ms; bucket 0 holds everything up to 1 ms.
BASE: Final = 1.25
N_BUCKETS: Final = 60  # 1.25^59 ms ≈ 8.7 min: longer than any Bedrock call may run
_LOG_BASE: Final = math.log(BASE)
#: The per-class counters of a bucket, in the order a window row holds them.
_KINDS: Final = "nteds"
_FAILURES: Final = FAILURES
#: Breaker records outlive any sensible open period but not an abandoned pool.
BREAKER_TTL_MS: Final = 86_400_000

#: KEYS: 1..R ring hashes, R+1 pool hash, R+2 pool leases, R+3 breaker hash, R+4 leader.
#: ARGV: 1 bucket ms, 2 instance id, 3 leader px (0: no claim), 4 probe op (1 claim,
#: -1 release), 5 breaker gen, 6 probe cap, 7 probes ok, 8 probes failed, 9.. field, delta.
#: Returns {now ms, live leases, dynamic limit (-1 none), leader 0/1, probe granted 0/1,
#: breaker HGETALL, ring HGETALLs of the last R-1 buckets}.
TICK_LUA: Final = load_script("fleet_tick")


def bucket_index(latency_ms: float) -> int:
    """The latency bucket of ``latency_ms`` (see :data:`BASE`)."""
    if latency_ms <= 1.0:
        return 0
    return min(N_BUCKETS - 1, math.ceil(math.log(latency_ms) / _LOG_BASE - 1e-9))


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


@dataclass(frozen=True, slots=True)
class PoolWindow:
    """A pool's fleet window: all classes, each class, and the peak in-flight sampled."""

    total: Window
    by_class: Mapping[str, Window]
    peak_in_flight: int
    #: How much time the window's data covers (its last bucket is still filling).
    span_ms: int = 0
    #: The highest peak in-flight of a bucket in which Bedrock throttled (None: none did):
    #: each is sampled once per tick and can only read low.
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
            p = fields.get("p", 0)
            if p > 0 and any(v and k.startswith("t|") for k, v in fields.items()):
                at_throttle = p if at_throttle is None else max(at_throttle, p)
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


class FleetUnavailable(Exception):
    """The fleet state could not be exchanged in time (error or timeout)."""


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


class _Exchange(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def tick(
        self, sends: Mapping[str, tuple[list[tuple[str, int]], PoolControl]]
    ) -> dict[str, PoolTick]: ...
    async def transition(self, pool: str, gen: int, state: int) -> tuple[bool, BreakerRecord]: ...


def _hash(flat: Sequence[Any]) -> dict[str, str]:
    return {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat), 2)}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class _RedisExchange:
    """The tick and breaker transitions on Redis (standalone or Cluster)."""

    def __init__(self, url: str, instance_id: str, bucket_ms: int, ring: int, timeout_s: float):
        self._client = redis_client(url, timeout_s)
        self._instance = instance_id
        self._bucket_ms = bucket_ms
        self._ring = ring
        self._timeout = timeout_s
        self._sha: dict[str, str] = {}
        self._keys: dict[str, list[str]] = {}

    def _pool_keys(self, pool: str) -> list[str]:
        keys = self._keys.get(pool)
        if keys is None:
            store = plan_keys(pool, "")
            base = f"sluice:{{{pool}}}"
            keys = [f"{base}:fleet:{i}" for i in range(self._ring)]
            keys += [store.pool, store.pool_leases, f"{base}:breaker", f"{base}:leader"]
            self._keys[pool] = keys
        return keys

    async def start(self) -> None:
        await self._load()

    async def close(self) -> None:
        await self._client.aclose()

    async def _load(self) -> None:
        async with asyncio.timeout(max(self._timeout, 2.0)):
            for name, text in (("tick", TICK_LUA), ("transition", TRANSITION_LUA)):
                self._sha[name] = str(await self._client.script_load(text))

    async def tick(
        self, sends: Mapping[str, tuple[list[tuple[str, int]], PoolControl]]
    ) -> dict[str, PoolTick]:
        out: dict[str, PoolTick] = {}
        try:
            if not self._sha:  # Redis was down at start
                await self._load()
            failed = await self._pipeline(list(sends), sends, out)
            if failed:
                # NOSCRIPT (restart, failover, flush) ran nothing, so resending cannot
                # double-count; a pipeline cannot recover it inline, so reload outside.
                log.info(orjson.dumps({"event": "fleet_script_reload"}).decode())
                await self._load()
                if await self._pipeline(failed, sends, out):
                    raise FleetUnavailable("tick script missing right after SCRIPT LOAD")
        except _FAILURES as exc:
            raise FleetUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return out

    async def _pipeline(
        self,
        pools: list[str],
        sends: Mapping[str, tuple[list[tuple[str, int]], PoolControl]],
        out: dict[str, PoolTick],
    ) -> list[str]:
        calls: list[tuple[int, list[Any]]] = []
        for pool in pools:
            fields, c = sends[pool]
            args: list[Any] = [self._bucket_ms, self._instance, c.leader_px, c.probe_op]
            args += [c.breaker_gen, c.probe_cap, c.probes_ok, c.probes_failed]
            for name, value in fields:
                args += (name, value)
            keys = self._pool_keys(pool)
            calls.append((len(keys), [*keys, *args]))
        sha = self._sha["tick"]
        async with asyncio.timeout(self._timeout):
            if isinstance(self._client, RedisCluster):
                # redis-py refuses EVALSHA in cluster pipelines; concurrent calls cost the
                # same one round trip of wall time (each pool is one slot on one master).
                results: list[Any] = await asyncio.gather(
                    *(self._client.evalsha(sha, n, *a) for n, a in calls), return_exceptions=True
                )
            else:
                pipe = self._client.pipeline(transaction=False)
                for n, a in calls:
                    pipe.evalsha(sha, n, *a)
                results = await pipe.execute(raise_on_error=False)
        failed: list[str] = []
        for pool, res in zip(pools, results, strict=True):
            if isinstance(res, NoScriptError):
                failed.append(pool)
            elif isinstance(res, BaseException):
                raise res
            else:
                out[pool] = self._parse(res)
        return failed

    def _parse(self, res: list[Any]) -> PoolTick:
        rows = []
        for flat in res[6]:
            h = _hash(flat)
            b = int(h.pop("b"))
            rows.append((b, {k: int(v) for k, v in h.items()}))
        lim = int(res[2])
        return PoolTick(
            int(res[0]),
            self._bucket_ms,
            int(res[1]),
            None if lim < 0 else lim,
            bool(res[3]),
            bool(res[4]),
            BreakerRecord.from_fields(_hash(res[5])),
            tuple(rows),
        )

    async def transition(self, pool: str, gen: int, state: int) -> tuple[bool, BreakerRecord]:
        key = self._pool_keys(pool)[-2]
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    res = await self._client.evalsha(
                        self._sha["transition"], 1, key, gen, state, BREAKER_TTL_MS
                    )
                except NoScriptError:
                    await self._load()
                    res = await self._client.evalsha(
                        self._sha["transition"], 1, key, gen, state, BREAKER_TTL_MS
                    )
        except _FAILURES as exc:
            raise FleetUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return bool(res[0]), BreakerRecord.from_fields(_hash(res[1]))


class _LocalPool:
    __slots__ = ("breaker", "leader_until", "rows")

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, int]] = {}
        self.leader_until = 0
        self.breaker = BreakerRecord()


class _LocalExchange:
    """The same tick in process (embedded mode: one instance, the store's own view)."""

    def __init__(self, store: Store, bucket_ms: int, ring: int) -> None:
        self._store = store
        self._bucket_ms = bucket_ms
        self._ring = ring
        self._pools: dict[str, _LocalPool] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _pool(self, pool: str) -> _LocalPool:
        p = self._pools.get(pool)
        if p is None:
            p = self._pools[pool] = _LocalPool()
        return p

    async def tick(
        self, sends: Mapping[str, tuple[list[tuple[str, int]], PoolControl]]
    ) -> dict[str, PoolTick]:
        out: dict[str, PoolTick] = {}
        for pool, (fields, c) in sends.items():
            stats = await self._store.pool_stats(pool)
            now = int(time.monotonic() * 1000)
            cur = now // self._bucket_ms
            p = self._pool(pool)
            row = p.rows.setdefault(cur, {})
            live = int(stats.get("in_flight", 0))
            row["p"] = max(row.get("p", 0), live)
            for name, value in fields:
                row[name] = row.get(name, 0) + value
            for b in [b for b in p.rows if b <= cur - self._ring + 1]:
                del p.rows[b]
            leader = c.leader_px > 0 and now >= p.leader_until
            if leader:
                p.leader_until = now + c.leader_px
            granted = self._probe(p, c)
            lim = int(stats.get("dynamic_limit", -1))
            rows = tuple((b, dict(r)) for b, r in p.rows.items())
            out[pool] = PoolTick(
                now,
                self._bucket_ms,
                live,
                None if lim < 0 else lim,
                leader,
                granted,
                p.breaker,
                rows,
            )
        return out

    @staticmethod
    def _probe(p: _LocalPool, c: PoolControl) -> bool:
        rec = p.breaker
        if rec.state != HALF_OPEN or rec.gen != c.breaker_gen:
            return False
        granted = c.probe_op == 1 and rec.probes < c.probe_cap
        probes = rec.probes + (1 if granted else 0) - (1 if c.probe_op == -1 else 0)
        p.breaker = BreakerRecord(
            rec.state,
            rec.gen,
            rec.since_ms,
            probes,
            rec.ok + c.probes_ok,
            rec.fail + c.probes_failed,
        )
        return granted

    async def transition(self, pool: str, gen: int, state: int) -> tuple[bool, BreakerRecord]:
        p = self._pool(pool)
        if p.breaker.gen != gen:
            return False, p.breaker
        p.breaker = BreakerRecord(state, gen + 1, int(time.monotonic() * 1000))
        return True, p.breaker


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
        self._exchange: _Exchange = (
            _RedisExchange(url, instance_id, bucket_ms, ring, timeout_s)
            if url
            else _LocalExchange(store, bucket_ms, ring)
        )
        self._window: dict[str, dict[str, _Acc]] = {}

    async def start(self) -> None:
        """Load the scripts (raises :class:`FleetUnavailable` if Redis cannot be reached)."""
        try:
            await self._exchange.start()
        except _FAILURES as exc:
            raise FleetUnavailable(f"{type(exc).__name__}: {exc}") from exc

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

    def observe_demand(self, pool: str, priority: str) -> None:
        """Count one call refused for concurrency: demand Bedrock never saw."""
        self._acc(pool, priority).demand += 1

    async def exchange(self, controls: Mapping[str, PoolControl]) -> dict[str, PoolTick]:
        """Send this window (then forget it) plus ``controls``; return the fleet view per pool.

        Counts of a failed exchange are dropped, not resent: after a timeout they may have
        been applied, and double counts could open a breaker that should stay closed.
        """
        window, self._window = self._window, {}
        sends = {
            pool: (_fields(window.get(pool, {})), control) for pool, control in controls.items()
        }
        for pool in window.keys() - controls.keys():
            sends[pool] = (_fields(window[pool]), PoolControl())
        return await self._exchange.tick(sends)

    async def transition(self, pool: str, gen: int, state: int) -> tuple[bool, BreakerRecord]:
        """Compare-and-set the breaker of ``pool`` from generation ``gen`` to ``state``."""
        return await self._exchange.transition(pool, gen, state)
