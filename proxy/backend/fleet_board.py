"""The fleet board's keys in Redis: each instance's latest snapshot and the shared history.

All keys of one fleet share the hash tag ``{ops:<fleet>}`` (one slot on a cluster;
:func:`proxy.backend.keys.board_keys`)::

    sluice:{ops:<fleet>}:instances     zset    instance id -> snapshot expiry ms
    sluice:{ops:<fleet>}:snap:<id>     string  the instance's latest snapshot (JSON, TTL)
    sluice:{ops:<fleet>}:history       list    one chart point per 5-second slot (JSON)
    sluice:{ops:<fleet>}:history:<slot> string which instance wrote that slot's point (NX)

What the snapshots mean is :mod:`proxy.ops.fleetview`'s business; this module only moves them.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from proxy.backend.client import Redis, RedisCluster
from proxy.backend.keys import board_keys as _keys

#: How long an instance's snapshot counts after it was written.
TTL_MS = 10_000


async def read_board(
    client: Redis | RedisCluster, fleet: str
) -> tuple[list[dict[str, Any]], tuple[dict[str, Any], ...]]:
    """The live instances' snapshots and the fleet's history (three round trips)."""
    members, prefix, history_key = _keys(fleet)
    ids = await client.zrangebyscore(members, time.time() * 1000, "+inf")
    keys = [prefix + (i.decode() if isinstance(i, bytes) else str(i)) for i in ids]
    raw = await client.mget(keys) if keys else []
    history = tuple(orjson.loads(p) for p in await client.lrange(history_key, 0, -1))
    return [orjson.loads(r) for r in raw if r is not None], history


async def publish_snapshot(
    client: Redis | RedisCluster, fleet: str, snap: dict[str, Any], slot: int, slot_s: int
) -> bool:
    """Write this instance's snapshot; True when it claimed ``slot``'s history point."""
    members, prefix, history_key = _keys(fleet)
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.set(prefix + snap["id"], orjson.dumps(snap), px=TTL_MS)
    pipe.zadd(members, {snap["id"]: now * 1000 + TTL_MS})
    pipe.zremrangebyscore(members, "-inf", now * 1000)
    # The first instance to claim this slot writes its history point.
    pipe.set(f"{history_key}:{slot}", snap["id"], nx=True, ex=slot_s * 3)
    *_, claimed = await pipe.execute()
    return bool(claimed)


async def withdraw_snapshot(client: Redis | RedisCluster, fleet: str, instance: str) -> None:
    """Take an instance that is shutting down out of the fleet view."""
    members, prefix, _ = _keys(fleet)
    pipe = client.pipeline(transaction=False)
    pipe.delete(prefix + instance)
    pipe.zrem(members, instance)
    await pipe.execute()


async def append_history(
    client: Redis | RedisCluster, fleet: str, point: dict[str, Any], keep: int
) -> None:
    """Append one chart point, keeping the last ``keep``."""
    history_key = _keys(fleet)[2]
    await client.rpush(history_key, orjson.dumps(point))
    await client.ltrim(history_key, -keep, -1)
