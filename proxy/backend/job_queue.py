"""The durable queue on Redis Streams: one stream and consumer group per (pool, workload).

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

A batch that completes (its last record's line written) or is cancelled gets an expiry of
``server.jobs.retention_hours`` on its hash and its output hash, in the script that
finishes it: Redis deletes both, with no sweeper and across restarts. What cannot expire
with it (its entry in the index, its dead letters in the pool's hash) is removed by
:meth:`RedisQueue.sweep`, a bounded walk of the index every instance runs.

``<F>`` is empty for the default fleet and ``:fleet:<name>`` for any other
(:func:`~proxy.backend.keys.job_fleet_segment`): a fleet drains, lists and replays only
what was submitted to it, whatever other fleets share the Redis.

A submit registers its batch as ``submitting`` first, writes its records, then flips it
to ``running`` (:file:`scripts/job_submit_state.lua`); a failed one removes what it wrote.
Workers never run a record of a ``submitting`` batch, so a submit that fails half-way (Redis
at ``maxmemory``, a timeout) leaves nothing a worker would ever drain.

A submit checked against ``batch.max_queued_records`` holds room for its records first
(:file:`scripts/job_room.lua`, one key per workload: a workload's streams are in as many
Cluster slots as it has pools, so no one script can count them) and frees it once its
records are in; of two concurrent submits the later one to hold room counts the other's.

A record costs one claim script (XPENDING/XCLAIM or XREADGROUP, plus the attempt
count) and one completion script (HSETNX the line, counters, XACK, XDEL) besides its
admission. A worker killed mid-record leaves its entry pending; the next claim after
the lease takes it over (XPENDING IDLE + XCLAIM), attempts intact.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson

from proxy.backend.client import FAILURES, ResponseError, redis_client
from proxy.backend.keys import KEY_PREFIX, job_fleet_segment, pool_tag
from proxy.backend.runner import ScriptRunner, why
from proxy.jobs.queue import (
    DEFAULT_RETENTION_S,
    GROUP,
    BatchCompleted,
    BatchMeta,
    BatchRunning,
    Claimed,
    DeadLetter,
    Deleted,
    QueueFull,
    QueueUnavailable,
    ReplayOutcome,
    Stream,
    SubmitOutcomeUnknown,
)
from proxy.jobs.queue import pool_of as _pool_of
from proxy.jobs.records import Record

log = logging.getLogger("sluice.jobs")
T = TypeVar("T")
_CHUNK = 2000
#: The batch id in a stored dead letter's JSON (orjson writes no spaces).
_BATCH_ID = re.compile(rb'"batchId":"([^"]*)"')
#: How long a submit's hold on its workload's room lasts unless renewed: each chunk of
#: records that lands renews it, so only a submit that died (or whose room call timed out
#: and ran late) leaves a hold, and only for this long (not for SUBMIT_GRACE_MS).
ROOM_HOLD_MS = 60_000
_SCRIPTS = (
    "job_claim", "job_has_work", "job_renew", "job_finish", "job_finish_next", "job_replay",
    "job_submit_state", "job_discard", "job_room", "job_cancel", "job_delete", "job_forget",
)  # fmt: skip
#: Index entries one sweep looks at, and dead letters one script call removes, at most.
_SWEEP_IDS = 500
_FORGET_CHUNK = 500
_SUBMITTING = "submitting"
#: What a failed submit may do with what it wrote (RedisQueue._claim_undo).
_REMOVE, _RUNS, _UNKNOWN = "remove", "runs", "unknown"
_REPLAY_OUTCOMES: dict[str, ReplayOutcome] = {
    "replayed": "replayed", "batch_cancelled": "batch_cancelled",
    "batch_gone": "batch_gone", "already_replayed": "already_replayed",
}  # fmt: skip


class _Keys:
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _meta(batch_id: str, h: dict[Any, Any]) -> BatchMeta:
    g = {_text(k): _text(v) for k, v in h.items()}
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
        submitting=g.get("status") == _SUBMITTING,
    )


def _claimed(stream: Stream, res: Any) -> Claimed | None:
    """The claim script's reply ({id, flat fields, attempts} or nil) as a :class:`Claimed`."""
    if not res:
        return None
    entry_id, flat, attempts = res
    fields = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
    model = fields.get("m")
    return Claimed(
        stream=stream,
        entry_id=_text(entry_id),
        batch_id=_text(fields["b"]),
        record_id=_text(fields["r"]),
        model_input=bytes(fields["i"]),
        model=_text(model) if model else None,
        attempts=int(attempts),
    )


def _dead_letter(raw: bytes | str) -> DeadLetter:
    return DeadLetter.from_json(orjson.loads(raw))


class RedisQueue:
    """:class:`proxy.jobs.queue.JobQueue` on Redis or Redis Cluster."""

    def __init__(
        self,
        url: str,
        *,
        fleet: str | None = None,
        timeout_s: float = 2.0,
        retention_s: Callable[[], float] = lambda: DEFAULT_RETENTION_S,
    ) -> None:
        self._keys = _Keys(fleet)
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

    async def start(self) -> None:
        """Warn when Redis would lose accepted records on a restart (no AOF)."""
        try:
            info = await self._call(self._client.config_get("appendonly"), "config get")
        except (QueueUnavailable, ResponseError):
            return  # managed Redis often forbids CONFIG; nothing to check then
        values = list(info.values()) if isinstance(info, dict) else []
        if values and all(_text(v) != "yes" for v in values):
            log.warning(
                "redis has no AOF (appendonly no): batch records accepted since the last "
                "snapshot are lost if Redis restarts; set appendonly yes"
            )

    async def close(self) -> None:
        """Close the connection pool and the script runner's connections."""
        await self._runner.aclose()

    async def submit(
        self, meta: BatchMeta, records: list[Record], max_queued: int | None = None
    ) -> None:
        """:meth:`_submit`, holding room against ``max_queued`` (see the module docstring)
        from before the depth is read until every record is in (or removed)."""
        if max_queued is None:
            await self._submit(meta, records)
            return
        await self._hold_room(meta, len(records), max_queued)
        key = self._keys.room(meta.workload)

        async def landed(remaining: int) -> None:
            # What landed is counted by the streams' lengths now: holding it too would
            # count it twice (another submit refused for room that is there), and the hold
            # is renewed for the records still to come.
            await self._script("room", [key], [meta.batch_id, remaining, ROOM_HOLD_MS])

        try:
            await self._submit(meta, records, landed)
        finally:
            await self._free_room(meta)

    async def _hold_room(self, meta: BatchMeta, incoming: int, cap: int) -> None:
        """Hold room for ``incoming`` records, or raise QueueFull (holding nothing)."""
        args = [meta.batch_id, incoming, ROOM_HOLD_MS]
        try:
            held = int(await self._script("room", [self._keys.room(meta.workload)], args))
        except BaseException:  # (it may have run: a timed-out call, a cancelled caller)
            await self._free_room(meta)
            raise
        try:
            queued = held + await self._queued(meta.workload)
        except BaseException:
            await self._free_room(meta)
            raise
        if queued + incoming > cap:
            await self._free_room(meta)
            raise QueueFull(queued)

    async def _queued(self, workload: str) -> int:
        """Records in the workload's streams (waiting, in flight, or still submitting)."""
        streams = [s for s in await self.streams() if s.workload == workload]
        lengths = [
            await self._call(self._client.xlen(self._keys.stream(s)), "depth") for s in streams
        ]
        return sum(int(n) for n in lengths)

    async def _free_room(self, meta: BatchMeta) -> None:
        """Best effort: room not freed (the store is down) lapses after ROOM_HOLD_MS."""
        try:
            await self._call(
                self._client.hdel(self._keys.room(meta.workload), meta.batch_id), "room"
            )
        except Exception as exc:  # the submit's own outcome is what its caller gets
            log.warning(
                "a batch submit could not free the room it held under the queue cap",
                extra={"fields": {"batch_id": meta.batch_id, "error": why(exc)}},
            )

    async def _submit(
        self,
        meta: BatchMeta,
        records: list[Record],
        landed: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        """Batch registered as ``submitting``, every record pipelined in chunks, then flipped
        to ``running``: durable on return; on failure what was written is removed.

        Until the flip no worker runs a record of the batch (they leave them pending), so a
        submit that fails half-way cannot have a record run: the client's retry (as the 503
        says) then runs each record once. Registration comes first so that anything a failed
        cleanup leaves behind is in a stream the workers know, and is abandoned by them.
        """
        stream = self._keys.stream(meta.stream)
        mapping = {
            "workload": meta.workload,
            "pool": meta.pool,
            "model": meta.model,
            "inv": meta.invocation,
            "records": meta.records,
            "created": meta.created_ms,
            "status": _SUBMITTING,
        }
        batch = self._keys.batch(meta.pool, meta.batch_id)
        written: list[str] = []
        #: False while a chunk's replies are unread (a timeout): its ids are then unknown.
        known = True
        try:
            await self._call(self._client.hset(batch, mapping=mapping), "submit")
            await self._call(
                self._client.sadd(self._keys.streams, f"{meta.pool}\t{meta.workload}"), "submit"
            )
            await self._call(
                self._client.zadd(self._keys.batches, {meta.batch_id: meta.created_ms}), "submit"
            )
            try:
                await self._call(
                    self._client.xgroup_create(stream, GROUP, id="0", mkstream=True), "submit"
                )
            except QueueUnavailable as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            for start in range(0, len(records), _CHUNK):
                pipe = self._client.pipeline(transaction=False)
                for r in records[start : start + _CHUNK]:
                    fields = {"b": meta.batch_id, "r": r.record_id, "i": r.model_input}
                    pipe.xadd(stream, fields)
                known = False
                # Every reply, errors inline: the ids written before an error are the ones
                # to delete (Redis refuses XADD past maxmemory but keeps the earlier ones).
                replies = await self._call(pipe.execute(raise_on_error=False), "submit")
                known = True
                failed = [r for r in replies if isinstance(r, BaseException)]
                written += [_text(r) for r in replies if not isinstance(r, BaseException)]
                if failed:
                    raise QueueUnavailable(
                        f"submit: {why(failed[0])} (after {len(written)} of {len(records)} records)"
                    )
                if landed is not None:
                    await landed(len(records) - len(written))
            if await self._script("submit_state", [batch], ["running"]) != 1:
                # Only a worker taking this submit for dead (SUBMIT_GRACE_MS) gets here first.
                raise QueueUnavailable("submit: the batch was abandoned before it was complete")
        except BaseException:
            if await self._failed_submit(meta, batch, written, known):
                return
            raise

    async def _failed_submit(
        self, meta: BatchMeta, batch: str, written: list[str], known: bool
    ) -> bool:
        """After a submit failed (the exception being handled): True when it stands after
        all (its flip ran, only the reply was lost); else what it wrote is removed and the
        caller re-raises (or SubmitOutcomeUnknown is raised here)."""
        outcome = await self._claim_undo(batch)
        if outcome == _RUNS:
            # The flip to running did happen (only its reply was lost, or the client left
            # after it): the batch stands and may be running already. Undoing it now would
            # run its records twice once the client retried as a 503 tells it to.
            log.warning(
                "a batch submit's reply was lost after the batch was complete: it runs",
                extra={"fields": {"batch_id": meta.batch_id, "records": meta.records}},
            )
            # (cancelled: the caller left and it re-raises; the batch is listed, it runs)
            return isinstance(sys.exc_info()[1], QueueUnavailable)
        if outcome == _UNKNOWN:
            # Whether the flip ran cannot be told: nothing is removed (a batch still
            # submitting never runs and is abandoned by the workers), and the client is told
            # to look before resubmitting, not that nothing changed.
            raise SubmitOutcomeUnknown(meta.batch_id) from None
        await self._undo(meta, written, known)  # gone or ours: nothing of it ever ran
        return False

    async def _claim_undo(self, batch: str) -> str:
        """Whether a failed submit's batch may be removed: it is deleted here if it is still
        ``submitting``, atomically against its own flip to running (the same script).

        ``_REMOVE``: deleted now, or already gone (abandoned, or never written): nothing of
        it ever ran. ``_RUNS``: the flip won. ``_UNKNOWN``: the store did not answer (tried
        three times)."""
        for attempt in range(3):
            try:
                result = await self._script("submit_state", [batch], [""])
            except Exception:
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            return _RUNS if result == 0 else _REMOVE
        return _UNKNOWN

    async def _undo(self, meta: BatchMeta, written: list[str], known: bool) -> None:
        """Best effort: remove what a failed submit wrote. Whatever stays (the store is down)
        is still ``submitting``: workers never run it and abandon it after SUBMIT_GRACE_MS."""
        key = self._keys.stream(meta.stream)
        batch = self._keys.batch(meta.pool, meta.batch_id)
        try:
            # Deleting frees memory, so Redis allows it even past maxmemory (noeviction).
            for start in range(0, len(written), _CHUNK):
                ids = written[start : start + _CHUNK]
                pipe = self._client.pipeline(transaction=False)
                pipe.xack(key, GROUP, *ids)  # a worker may have claimed one meanwhile
                pipe.xdel(key, *ids)
                pipe.hdel(key + ":att", *ids)
                await self._call(pipe.execute(), "submit cleanup")
            if not known:
                await self._drop_entries(meta.stream, meta.batch_id)
            await self._call(self._client.delete(batch, batch + ":out"), "submit cleanup")
            await self._call(self._client.zrem(self._keys.batches, meta.batch_id), "submit cleanup")
        except Exception as exc:  # the submit's own error is what its caller gets
            log.warning(
                "a failed batch submit could not remove what it may have written: workers "
                "never run it and abandon it later",
                extra={"fields": {"batch_id": meta.batch_id, "written": len(written),
                                  "error": why(exc)}},
            )  # fmt: skip

    async def abandon(self, batch_id: str) -> int | None:
        """Delete a batch still ``submitting`` (atomically, so its submit's flip then fails)
        and drop the records it wrote; None when it is not submitting (any more)."""
        pool = _pool_of(batch_id)
        if pool is None:
            return None
        meta = await self.batch(batch_id)
        if meta is None or not meta.submitting:
            return None
        batch = self._keys.batch(pool, batch_id)
        if await self._script("submit_state", [batch], [""]) != 1:
            return None
        dropped = await self._drop_entries(meta.stream, batch_id)
        await self._call(self._client.delete(batch + ":out"), "abandon")
        await self._call(self._client.zrem(self._keys.batches, batch_id), "abandon")
        return dropped

    async def release(self, claimed: Claimed) -> None:
        """Uncount the attempt; the entry stays pending, so it is claimed again after its lease."""
        key = self._keys.stream(claimed.stream) + ":att"
        await self._call(self._client.hincrby(key, claimed.entry_id, -1), "release")

    async def streams(self) -> list[Stream]:
        """Every (pool, workload) a batch was submitted to."""
        members = await self._call(self._client.smembers(self._keys.streams), "streams")
        out = [Stream(*_text(m).split("\t", 1)) for m in members]
        return sorted(out)

    async def claim(self, stream: Stream, consumer: str, lease_ms: int) -> Claimed | None:
        """Expired lease first, else the next new record; the attempt is counted here."""
        key = self._keys.stream(stream)
        res = await self._script("claim", [key, key + ":att"], [GROUP, consumer, lease_ms])
        return _claimed(stream, res)

    async def complete_and_claim(
        self,
        claimed: Claimed,
        line: bytes,
        tokens: tuple[int, int],
        consumer: str,
        lease_ms: int,
    ) -> tuple[bool, Claimed | None]:
        """One script: finish ``claimed`` as succeeded and claim the stream's next record."""
        args = [GROUP, claimed.entry_id, claimed.record_id, line, "ok", *tokens, consumer, lease_ms]
        args.append(self._keep_ms())
        new, res = await self._script("finish_next", self._finish_keys(claimed), args)
        return bool(new), _claimed(claimed.stream, res)

    async def has_work(self, stream: Stream, lease_ms: int) -> bool:
        """Undelivered entries after the group's last-delivered id, or an expired lease."""
        res = await self._script("has_work", [self._keys.stream(stream)], [GROUP, lease_ms])
        return bool(res)

    async def renew(
        self, stream: Stream, consumer: str, entry_ids: list[str], lease_ms: int
    ) -> list[str]:
        """Reset the idle time of the entries this consumer still owns."""
        kept = await self._script(
            "renew", [self._keys.stream(stream)], [GROUP, consumer, *entry_ids]
        )
        return [_text(k) for k in kept]

    async def next_attempt(self, claimed: Claimed) -> int:
        """HINCRBY the entry's attempt count."""
        key = self._keys.stream(claimed.stream) + ":att"
        return int(await self._call(self._client.hincrby(key, claimed.entry_id, 1), "attempt"))

    def _finish_keys(self, c: Claimed) -> list[str]:
        key = self._keys.stream(c.stream)
        batch = self._keys.batch(c.stream.pool, c.batch_id)
        return [key, key + ":att", batch, batch + ":out", key + ":rate"]

    async def complete(
        self, claimed: Claimed, line: bytes | None, ok: bool, tokens: tuple[int, int]
    ) -> bool:
        """One script: the line (if new), the counters, XACK and XDEL."""
        outcome = "skip" if line is None else ("ok" if ok else "err")
        args = [GROUP, claimed.entry_id, claimed.record_id, line or b"", outcome, *tokens]
        args.append(self._keep_ms())
        res = await self._script("finish", self._finish_keys(claimed), args)
        return bool(res)

    async def dead_letter(self, claimed: Claimed, entry: DeadLetter, line: bytes) -> bool:
        """The error line plus the dead-letter entry, in the same script."""
        tag = self._keys.tag(claimed.stream.pool)
        args = [
            GROUP, claimed.entry_id, claimed.record_id, line, "err", 0, 0,
            entry.dlq_id, orjson.dumps(entry.to_json()), f"{entry.workload}\t{entry.reason}",
            self._keep_ms(),
        ]  # fmt: skip
        keys = [*self._finish_keys(claimed), f"{tag}:dlq", f"{tag}:dlq:n"]
        return bool(await self._script("finish", keys, args))

    async def batch(self, batch_id: str) -> BatchMeta | None:
        """HGETALL of the batch hash (the id names its pool)."""
        pool = _pool_of(batch_id)
        if pool is None:
            return None
        h = await self._call(self._client.hgetall(self._keys.batch(pool, batch_id)), "batch")
        if not h or "workload" not in {_text(k) for k in h}:
            # (A hash without its meta: a record of a deleted batch finished by an instance of
            # an older release, which recreates it with its counters alone. Not a batch.)
            return None
        return _meta(batch_id, h)

    async def batches(self, workload: str | None) -> list[BatchMeta]:
        """Newest first (at most 1,000); a batch still ``submitting`` is not listed yet."""
        ids = await self._call(self._client.zrevrange(self._keys.batches, 0, 999), "batches")
        metas = [await self.batch(_text(i)) for i in ids]
        return [
            m
            for m in metas
            if m is not None and not m.submitting and workload in (None, m.workload)
        ]

    async def output(self, batch_id: str) -> AsyncIterator[bytes]:
        """HSCAN of the output hash, one line at a time."""
        pool = _pool_of(batch_id)
        if pool is None:
            return
        key = self._keys.batch(pool, batch_id) + ":out"
        cursor = 0
        while True:
            cursor, chunk = await self._call(self._client.hscan(key, cursor, count=1000), "output")
            for line in chunk.values():
                yield bytes(line)
            if cursor == 0:
                return

    async def cancel(self, batch_id: str) -> BatchMeta | None:
        """Mark cancelled, then drop the batch's entries from its stream."""
        meta = await self.batch(batch_id)
        if meta is None:
            return None
        batch = self._keys.batch(meta.pool, batch_id)
        marked = await self._script("cancel", [batch, batch + ":out"], [self._keep_ms()])
        if not marked:
            return None  # expired or deleted since it was read
        if marked == 2:
            raise BatchCompleted(batch_id)
        await self._drop_entries(meta.stream, batch_id)
        meta.cancelled = True
        return meta

    async def _drop_entries(self, stream: Stream, batch_id: str) -> int:
        """XACK and XDEL every entry of one batch in its stream; how many there were."""
        key = self._keys.stream(stream)
        start, dropped = "-", 0
        while True:
            entries = await self._call(self._client.xrange(key, start, "+", count=1000), "drop")
            mine = [eid for eid, f in entries if _text(f.get(b"b", b"")) == batch_id]
            if mine:
                await self._call(self._client.xack(key, GROUP, *mine), "drop")
                await self._call(self._client.xdel(key, *mine), "drop")
                dropped += len(mine)
            if len(entries) < 1000:
                return dropped
            start = "(" + _text(entries[-1][0])

    async def delete(self, batch_id: str) -> Deleted | None:
        """One script deletes the meta and output (refused while running), then the
        records still queued, the dead letters and the index entry go."""
        meta = await self.batch(batch_id)
        if meta is None:
            return None
        batch = self._keys.batch(meta.pool, batch_id)
        lines = int(await self._script("delete", [batch, batch + ":out"], []))
        if lines == -2:
            raise BatchRunning(batch_id)
        if lines < 0:
            return None
        # From here on the batch is gone for every route and worker; if this stops half-way
        # (Redis down), the sweep finds its index entry and finishes the job.
        # A completed batch has nothing queued; a cancelled one had its entries dropped at
        # the cancel, looked for again here in case that stopped half-way (reading the whole
        # stream, so only then).
        queued = await self._drop_entries(meta.stream, batch_id) if meta.cancelled else 0
        letters = await self._forget_dead_letters({batch_id})
        await self._call(self._client.zrem(self._keys.batches, batch_id), "delete")
        return Deleted(lines, queued, letters)

    async def sweep(self) -> int:
        """Look at the next :data:`_SWEEP_IDS` index entries: one whose batch expired (or was
        deleted half-way) loses its dead letters, then its entry. How many entries it removed."""
        start = self._sweep_at
        raw = await self._call(
            self._client.zrange(self._keys.batches, start, start + _SWEEP_IDS - 1), "sweep"
        )
        ids = [_text(i) for i in raw]
        keys = [self._keys.batch(_pool_of(i) or "-", i) for i in ids]
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.pttl(key)  # -2: gone (expired or deleted); -1: no expiry yet
        ttls = await self._call(pipe.execute(), "sweep") if ids else []
        gone = {i for i, ttl in zip(ids, ttls, strict=True) if ttl == -2}
        await self._retire_unexpiring([k for k, ttl in zip(keys, ttls, strict=True) if ttl == -1])
        # The entries removed shift those after them down: start where the next one now is.
        self._sweep_at = 0 if len(ids) < _SWEEP_IDS else start + len(ids) - len(gone)
        if not gone:
            return 0
        await self._forget_dead_letters(gone)
        return int(await self._call(self._client.zrem(self._keys.batches, *gone), "sweep"))

    async def _retire_unexpiring(self, bare: list[str]) -> None:
        """Finished batches among these keys with no expiry (they finished before retention
        existed, or on an instance of an older release) get one now, counted from now:
        without it they would stay for good. Running and submitting ones keep none."""
        if not bare:
            return
        pipe = self._client.pipeline(transaction=False)
        for key in bare:
            pipe.hmget(key, "status", "records", "ok", "err")
        rows = await self._call(pipe.execute(), "sweep")
        keep, pipe, due = self._keep_ms(), self._client.pipeline(transaction=False), 0
        for key, (status, records, ok, err) in zip(bare, rows, strict=True):
            state = _text(status) if status is not None else ""
            done = int(ok or 0) + int(err or 0)
            finished = records is not None and done >= int(records)
            if state == "cancelled" or (state != _SUBMITTING and finished):
                pipe.pexpire(key, keep)
                pipe.pexpire(key + ":out", keep)
                due += 1
        if due:
            await self._call(pipe.execute(), "sweep")

    async def _forget_dead_letters(self, batch_ids: set[str]) -> int:
        """Remove the dead letters of these (deleted) batches; how many were removed.

        Only the pools these batches were on, a page at a time (HSCAN), and a document is
        parsed only when the batch id its bytes name is one of them: HVALS of every pool
        blocked Redis, the one quota admission uses, for 0.9 s at 45,000 dead letters, and
        parsing them all stalled the event loop for 2.8 s."""
        removed = 0
        for pool in sorted({p for p in map(_pool_of, batch_ids) if p is not None}):
            tag = self._keys.tag(pool)
            args: list[Any] = []
            cursor = 0
            while True:
                cursor, page = await self._call(
                    self._client.hscan(f"{tag}:dlq", cursor, count=_FORGET_CHUNK), "sweep"
                )
                for raw in page.values():
                    data = raw if isinstance(raw, bytes) else str(raw).encode()
                    named = _BATCH_ID.search(data)
                    if named is None or named.group(1).decode() in batch_ids:
                        d = _dead_letter(raw)  # (no id found: parsed to be sure)
                        if d.batch_id in batch_ids:
                            args += [d.dlq_id, f"{d.workload}\t{d.reason}"]
                if not cursor:
                    break
            for at in range(0, len(args), 2 * _FORGET_CHUNK):
                chunk = args[at : at + 2 * _FORGET_CHUNK]
                removed += int(await self._script("forget", [f"{tag}:dlq", f"{tag}:dlq:n"], chunk))
        return removed

    async def depth(self, stream: Stream) -> tuple[int, float]:
        """XLEN, and the age of the first entry from its id's milliseconds."""
        key = self._keys.stream(stream)
        length = await self._call(self._client.xlen(key), "depth")
        if not length:
            return 0, 0.0
        first = await self._call(self._client.xrange(key, "-", "+", count=1), "depth")
        if not first:
            return int(length), 0.0
        ms = int(_text(first[0][0]).split("-")[0])
        return int(length), max(0.0, time.time() - ms / 1000)

    async def drain_rate(self, stream: Stream) -> float:
        """The last six complete 10-second buckets, per second (Redis's clock)."""
        key = self._keys.stream(stream) + ":rate"
        now_s, _ = await self._call(self._client.time(), "rate")
        current = int(now_s) // 10
        h = await self._call(self._client.hgetall(key), "rate")
        done = sum(int(v) for k, v in h.items() if current - 6 <= int(_text(k)) < current)
        return done / 60.0

    async def dead_letters(self) -> list[DeadLetter]:
        """HVALS of every pool's dead-letter hash."""
        pools = sorted({s.pool for s in await self.streams()})
        out: list[DeadLetter] = []
        for pool in pools:
            raw = await self._call(self._client.hvals(f"{self._keys.tag(pool)}:dlq"), "dlq")
            out.extend(_dead_letter(r) for r in raw)
        return sorted(out, key=lambda d: d.at_ms)

    async def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        """HGETALL of every pool's ``dlq:n`` (kept by the scripts that add and remove)."""
        counts: dict[tuple[str, str], int] = {}
        for pool in sorted({s.pool for s in await self.streams()}):
            h = await self._call(self._client.hgetall(f"{self._keys.tag(pool)}:dlq:n"), "dlq")
            for field, n in h.items():
                workload, _, reason = _text(field).partition("\t")
                counts[workload, reason] = counts.get((workload, reason), 0) + int(n)
        return counts

    async def discard(self, entries: list[DeadLetter]) -> list[DeadLetter]:
        """One script per pool and chunk: HDEL each entry, its count with it."""
        by_id = {e.dlq_id: e for e in entries}
        dropped: list[DeadLetter] = []
        for pool in sorted({e.pool for e in entries}):
            mine = [e for e in entries if e.pool == pool]
            tag = self._keys.tag(pool)
            for start in range(0, len(mine), _CHUNK):
                args = [a for e in mine[start : start + _CHUNK]
                        for a in (e.dlq_id, f"{e.workload}\t{e.reason}")]  # fmt: skip
                ids = await self._script("discard", [f"{tag}:dlq", f"{tag}:dlq:n"], args)
                dropped += [by_id[_text(i)] for i in ids]
        return dropped

    async def dead_letter_by_id(self, dlq_id: str) -> DeadLetter | None:
        """HGET by id (the id names its pool)."""
        pool = _pool_of(dlq_id)
        if pool is None:
            return None
        raw = await self._call(self._client.hget(f"{self._keys.tag(pool)}:dlq", dlq_id), "dlq")
        return _dead_letter(raw) if raw else None

    async def replay(self, entry: DeadLetter, model: str | None) -> ReplayOutcome:
        """One script: unless its batch is cancelled or gone, drop the entry and its error
        line and XADD the record again."""
        tag = self._keys.tag(entry.pool)
        batch = self._keys.batch(entry.pool, entry.batch_id)
        stream = self._keys.stream(Stream(entry.pool, entry.workload))
        fields: list[Any] = ["b", entry.batch_id, "r", entry.record_id, "i", entry.model_input]
        if model:
            fields += ["m", model]
        res = await self._script(
            "replay",
            [f"{tag}:dlq", f"{tag}:dlq:n", batch + ":out", batch, stream],
            [entry.dlq_id, entry.record_id, f"{entry.workload}\t{entry.reason}", *fields],
        )
        outcome = _REPLAY_OUTCOMES.get(_text(res))
        if outcome is None:
            raise QueueUnavailable(f"replay: unexpected reply {_text(res)[:40]!r}")
        return outcome
