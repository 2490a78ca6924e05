"""How a tick reaches the fleet: one round trip to Redis, or the same tick in process.

:class:`RedisExchange` runs one ``EVALSHA`` of :data:`TICK_LUA` per pool, pipelined on
one Redis, sent concurrently on a Cluster (redis-py refuses scripts in cluster
pipelines; each pool is one slot, so each call is one master's round trip), and the
breaker's compare-and-set, both through :class:`~proxy.backend.runner.ScriptRunner`
(NOSCRIPT reload, timeouts, one :class:`~proxy.backend.BackendUnavailable`).
:class:`LocalExchange` is the embedded twin (one instance). The key layout is in
:mod:`proxy.control.fleet`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

from proxy.admission import Store
from proxy.admission.model import plan_keys
from proxy.backend import BackendUnavailable
from proxy.backend.client import redis_client
from proxy.backend.lua import load_script
from proxy.backend.runner import Arg, ScriptRunner
from proxy.control.breaker import HALF_OPEN, BreakerRecord
from proxy.control.window import PoolControl, PoolTick

log = logging.getLogger("sluice.fleet")

#: Breaker records outlive any sensible open period but not an abandoned pool.
BREAKER_TTL_MS: Final = 86_400_000

#: KEYS: 1..R ring hashes, R+1 pool hash, R+2 pool leases, R+3 breaker hash, R+4 leader.
#: ARGV: 1 bucket ms, 2 instance id, 3 leader px (0: no claim), 4 probe op (1 claim,
#: -1 release), 5 breaker gen, 6 probe cap, 7 probes ok, 8 probes failed, 9.. field, delta.
#: Returns {now ms, live leases, dynamic limit (-1 none), leader 0/1, probe granted 0/1,
#: breaker HGETALL, ring HGETALLs of the last R-1 buckets, the limit's change time}.
TICK_LUA: Final = load_script("fleet_tick")
#: The scripts one exchange runs (``proxy/backend/scripts/<name>.lua``).
_SCRIPTS: Final = ("fleet_tick", "breaker_transition", "fleet_reflex", "fleet_set_limit")

#: What a throttle reflex read and did: (what Bedrock held: the reading, limit before,
#: limit after (None: no dynamic limit set), the fleet's time in ms, the slots held now).
Reflexed = tuple[int, int | None, int | None, int, int]
#: A compare-and-set of the limit: (applied, the limit now (None: none), its change time
#: in fleet ms (None: unknown)).
LimitSet = tuple[bool, int | None, int | None]


#: Per pool: this tick's (field, delta) counts and what the instance asks of the fleet.
Sends = Mapping[str, tuple[list[tuple[str, int]], PoolControl]]


#: The fleet state could not be exchanged in time: the backend's one failure.
FleetUnavailable = BackendUnavailable


class Exchange(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def tick(self, sends: Sends) -> dict[str, PoolTick]: ...
    async def transition(self, pool: str, gen: int, state: int) -> tuple[bool, BreakerRecord]: ...
    async def reflex(
        self, pool: str, lowest: int, lease: str | None, others: Sequence[str] = ()
    ) -> Reflexed: ...
    async def set_limit(self, pool: str, expected: int | None, new: int) -> LimitSet: ...


def _hash(flat: Sequence[Any]) -> dict[str, str]:
    return {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat), 2)}


def _limit(v: Any) -> int | None:
    lim = int(v)
    return None if lim < 0 else lim


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisExchange:
    """The tick and breaker transitions on Redis (standalone or Cluster)."""

    def __init__(self, url: str, instance_id: str, bucket_ms: int, ring: int, timeout_s: float):
        self._client = redis_client(url, timeout_s)
        self._runner = ScriptRunner(self._client, _SCRIPTS, timeout_s, log)
        self._instance = instance_id
        self._bucket_ms = bucket_ms
        self._ring = ring
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
        await self._runner.start()

    async def close(self) -> None:
        await self._runner.aclose()

    async def tick(self, sends: Sends) -> dict[str, PoolTick]:
        calls: list[tuple[list[str], list[Arg]]] = []
        for pool, (fields, c) in sends.items():
            args: list[Arg] = [self._bucket_ms, self._instance, c.leader_px, c.probe_op]
            args += [c.breaker_gen, c.probe_cap, c.probes_ok, c.probes_failed]
            for name, value in fields:
                args += (name, value)
            calls.append((self._pool_keys(pool), args))
        results = await self._runner.run_many("fleet_tick", calls)
        return {pool: self._parse(res) for pool, res in zip(sends, results, strict=True)}

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
            _limit(res[7]),
        )

    async def transition(self, pool: str, gen: int, state: int) -> tuple[bool, BreakerRecord]:
        key = self._pool_keys(pool)[-2]
        res = await self._runner.run("breaker_transition", [key], [gen, state, BREAKER_TTL_MS])
        return bool(res[0]), BreakerRecord.from_fields(_hash(res[1]))

    async def reflex(
        self, pool: str, lowest: int, lease: str | None, others: Sequence[str] = ()
    ) -> Reflexed:
        keys = self._pool_keys(pool)
        args: list[Arg] = [lowest, lease or "", *others]
        res = await self._runner.run("fleet_reflex", [keys[-4], keys[-3]], args)
        return int(res[0]), _limit(res[1]), _limit(res[2]), int(res[3]), int(res[4])

    async def set_limit(self, pool: str, expected: int | None, new: int) -> LimitSet:
        key = self._pool_keys(pool)[-4]
        old = -1 if expected is None else expected
        res = await self._runner.run("fleet_set_limit", [key], [old, new])
        return bool(res[0]), _limit(res[1]), _limit(res[2])


class _LocalPool:
    __slots__ = ("breaker", "leader_until", "limit_ms", "rows")

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, int]] = {}
        self.leader_until = 0
        self.breaker = BreakerRecord()
        self.limit_ms: int | None = None


class LocalExchange:
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

    async def tick(self, sends: Sends) -> dict[str, PoolTick]:
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
                # q is a level (in flight at a throttle): the bucket keeps its lowest.
                row[name] = (
                    min(row.get(name, value), value) if name == "q" else row.get(name, 0) + value
                )
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
                p.limit_ms,
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

    async def reflex(
        self, pool: str, lowest: int, lease: str | None, others: Sequence[str] = ()
    ) -> Reflexed:
        # The embedded store never yields inside these calls: read and write are one step.
        stats = await self._store.pool_stats(pool)
        now = int(time.monotonic() * 1000)
        live, lim = int(stats.get("in_flight", 0)), _limit(stats.get("dynamic_limit", -1))
        held = live
        if lease and not await self._store.holds_lease(pool, lease):
            live += 1  # the refused call's release ran first: it was in flight all the same
        for other in others:  # refused too, lease not yet given back: not at Bedrock
            live -= int(await self._store.holds_lease(pool, other))
        target = max(lowest, live - 1)
        if lim is None or target >= lim:
            return live, lim, lim, now, held
        await self._store.set_pool_limit(pool, target)
        self._pool(pool).limit_ms = now
        return live, lim, target, now, held

    async def set_limit(self, pool: str, expected: int | None, new: int) -> LimitSet:
        stats = await self._store.pool_stats(pool)
        cur, p = _limit(stats.get("dynamic_limit", -1)), self._pool(pool)
        if cur != expected:
            return False, cur, p.limit_ms
        await self._store.set_pool_limit(pool, new)
        p.limit_ms = int(time.monotonic() * 1000)
        return True, new, p.limit_ms
