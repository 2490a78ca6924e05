"""The Redis job queue's keys and the reads its halves share (:mod:`.job_submit`,
:mod:`.job_queue`): one stream and consumer group per (pool, workload).

Key layout (``{<pool>}`` is the Cluster hash tag, so each script touches one slot)::

    sluice:{<pool>}<F>:jobs:<workload>        stream  b=batch r=recordId i=modelInput [m=model]
    sluice:{<pool>}<F>:jobs:<workload>:att    hash    entry id -> attempts (counted by Sluice)
    sluice:{<pool>}<F>:jobs:<workload>:rate   hash    10-second bucket -> records finished
    sluice:{<pool>}<F>:batch:<id>             hash    meta and counters (status submitting,
                                                      running or cancelled)
    sluice:{<pool>}<F>:batch:<id>:out         hash    recordId -> output line (HSETNX: one each)
    sluice:{<pool>}<F>:dlq                    hash    dead-letter id -> entry (JSON)
    sluice:{<pool>}<F>:dlq:n                  hash    "<workload>\\t<reason>" -> count
    sluice<F>:jobs:streams                    set     "<pool>\\t<workload>" of every stream
    sluice<F>:jobs:batches                    zset    batch id -> created ms (listing)
    sluice<F>:jobs:room:<workload>            hash    batch id -> "<records> <expires ms>":
                                                      submits in progress (the queue cap)

``<F>`` is empty for the default fleet and ``:fleet:<name>`` for any other
(:func:`~proxy.backend.keys.job_fleet_segment`): a fleet drains, lists and replays only
what was submitted to it, whatever other fleets share the Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from proxy.backend.client import FAILURES, redis_client
from proxy.backend.keys import KEY_PREFIX, job_fleet_segment, pool_tag
from proxy.backend.runner import ScriptRunner
from proxy.jobs.queue import (
    DEFAULT_RETENTION_S,
    GROUP,
    BatchMeta,
    QueueUnavailable,
    Stream,
)
from proxy.jobs.queue import pool_of as _pool_of

log = logging.getLogger("sluice.jobs")
T = TypeVar("T")
#: Records one pipeline writes (a submit) or one script call takes (a replay), at most.
CHUNK = 2000
_SCRIPTS = (
    "job_claim", "job_has_work", "job_renew", "job_finish", "job_finish_next", "job_replay",
    "job_submit_state", "job_discard", "job_room", "job_cancel", "job_delete", "job_forget",
)  # fmt: skip
SUBMITTING = "submitting"


class JobKeys:
    """The key names of one fleet's queue (see the module docstring)."""

    def __init__(self, fleet: str | None) -> None:
        self._fleet = job_fleet_segment(fleet)
        self.streams = f"{KEY_PREFIX}{self._fleet}:jobs:streams"
        self.batches = f"{KEY_PREFIX}{self._fleet}:jobs:batches"

    def tag(self, pool: str) -> str:
        return pool_tag(pool) + self._fleet

    def stream(self, s: Stream) -> str:
        return f"{self.tag(s.pool)}:jobs:{s.workload}"

    def batch(self, pool: str, batch_id: str) -> str:
        return f"{self.tag(pool)}:batch:{batch_id}"

    def room(self, workload: str) -> str:
        return f"{KEY_PREFIX}{self._fleet}:jobs:room:{workload}"


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _meta(batch_id: str, h: dict[Any, Any]) -> BatchMeta:
    g = {text(k): text(v) for k, v in h.items()}
    return BatchMeta(
        batch_id=batch_id,
        workload=g["workload"],
        pool=g["pool"],
        model=g["model"],
        invocation="converse" if g["inv"] == "converse" else "invoke",
        records=int(g["records"]),
        created_ms=int(g["created"]),
        succeeded=int(g.get("ok", 0)),
        failed=int(g.get("err", 0)),
        cancelled=g.get("status") == "cancelled",
        input_tokens=int(g.get("in_tok", 0)),
        output_tokens=int(g.get("out_tok", 0)),
        submitting=g.get("status") == SUBMITTING,
    )


class RedisJobs:
    """The connection, the scripts and the reads both halves of the queue use."""

    def __init__(
        self,
        url: str,
        *,
        fleet: str | None = None,
        timeout_s: float = 2.0,
        retention_s: Callable[[], float] = lambda: DEFAULT_RETENTION_S,
    ) -> None:
        self._keys = JobKeys(fleet)
        self._retention_s = retention_s
        #: Rank in the batch index where the next sweep starts (it wraps round).
        self._sweep_at = 0
        # Typed loosely: redis-py's stubs cannot express replies of our own scripts.
        self._client: Any = redis_client(url, timeout_s)
        self._timeout_s = timeout_s
        self._runner = ScriptRunner(self._client, _SCRIPTS, timeout_s, log)

    async def _call(self, aw: Awaitable[T], what: str) -> T:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await aw
        except FAILURES as exc:
            raise QueueUnavailable(f"{what}: {type(exc).__name__}: {exc}") from None

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """``scripts/job_<name>.lua`` (loaded on first use; raises QueueUnavailable)."""
        return await self._runner.run(f"job_{name}", keys, args)

    def _keep_ms(self) -> int:
        """The retention in force (read per call: a policy reload changes it)."""
        return max(1, int(self._retention_s() * 1000))

    async def streams(self) -> list[Stream]:
        """Every (pool, workload) a batch was submitted to."""
        members = await self._call(self._client.smembers(self._keys.streams), "streams")
        out = [Stream(*text(m).split("\t", 1)) for m in members]
        return sorted(out)

    async def batch(self, batch_id: str) -> BatchMeta | None:
        """HGETALL of the batch hash (the id names its pool)."""
        pool = _pool_of(batch_id)
        if pool is None:
            return None
        h = await self._call(self._client.hgetall(self._keys.batch(pool, batch_id)), "batch")
        if not h or "workload" not in {text(k) for k in h}:
            # (A hash without its meta: a record of a deleted batch finished by an instance of
            # an older release, which recreates it with its counters alone. Not a batch.)
            return None
        return _meta(batch_id, h)

    async def _drop_entries(self, stream: Stream, batch_id: str) -> int:
        """XACK and XDEL every entry of one batch in its stream; how many there were."""
        key = self._keys.stream(stream)
        start, dropped = "-", 0
        while True:
            entries = await self._call(self._client.xrange(key, start, "+", count=1000), "drop")
            mine = [eid for eid, f in entries if text(f.get(b"b", b"")) == batch_id]
            if mine:
                await self._call(self._client.xack(key, GROUP, *mine), "drop")
                await self._call(self._client.xdel(key, *mine), "drop")
                dropped += len(mine)
            if len(entries) < 1000:
                return dropped
            start = "(" + text(entries[-1][0])
