"""Submitting a batch to the Redis job queue (:mod:`.job_store` has the key layout).

A submit registers its batch as ``submitting`` first, writes its records, then flips it
to ``running`` (:file:`scripts/job_submit_state.lua`); a failed one removes what it wrote.
Workers never run a record of a ``submitting`` batch, so a submit that fails half-way (Redis
at ``maxmemory``, a timeout) leaves nothing a worker would ever drain.

A submit checked against ``batch.max_queued_records`` holds room for its records first
(:file:`scripts/job_room.lua`, one key per workload: a workload's streams are in as many
Cluster slots as it has pools, so no one script can count them) and frees it once its
records are in; of two concurrent submits the later one to hold room counts the other's.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

from proxy.backend.job_store import CHUNK, SUBMITTING, RedisJobs, log, text
from proxy.backend.runner import why
from proxy.jobs.queue import (
    GROUP,
    BatchMeta,
    QueueFull,
    QueueUnavailable,
    SubmitOutcomeUnknown,
)
from proxy.jobs.queue import pool_of as _pool_of
from proxy.jobs.records import Record

#: How long a submit's hold on its workload's room lasts unless renewed: each chunk of
#: records that lands renews it, so only a submit that died (or whose room call timed out
#: and ran late) leaves a hold, and only for this long (not for SUBMIT_GRACE_MS).
ROOM_HOLD_MS = 60_000
#: What a failed submit may do with what it wrote (RedisSubmits._claim_undo).
_REMOVE, _RUNS, _UNKNOWN = "remove", "runs", "unknown"


class RedisSubmits(RedisJobs):
    """Submit and abandon: a batch is written whole or not at all."""

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
            "status": SUBMITTING,
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
            for start in range(0, len(records), CHUNK):
                pipe = self._client.pipeline(transaction=False)
                for r in records[start : start + CHUNK]:
                    fields = {"b": meta.batch_id, "r": r.record_id, "i": r.model_input}
                    pipe.xadd(stream, fields)
                known = False
                # Every reply, errors inline: the ids written before an error are the ones
                # to delete (Redis refuses XADD past maxmemory but keeps the earlier ones).
                replies = await self._call(pipe.execute(raise_on_error=False), "submit")
                known = True
                failed = [r for r in replies if isinstance(r, BaseException)]
                written += [text(r) for r in replies if not isinstance(r, BaseException)]
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
            for start in range(0, len(written), CHUNK):
                ids = written[start : start + CHUNK]
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
