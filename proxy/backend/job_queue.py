"""The durable queue on Redis Streams: draining, listing, dead letters and retention
(:mod:`.job_store` has the key layout, :mod:`.job_submit` the submit).

A batch that completes (its last record's line written) or is cancelled gets an expiry of
``server.jobs.retention_hours`` on its hash and its output hash, in the script that
finishes it: Redis deletes both, with no sweeper and across restarts. What cannot expire
with it (its entry in the index, its dead letters in the pool's hash) is removed by
:meth:`RedisQueue.sweep`, a bounded walk of the index every instance runs.

A record costs one claim script (XPENDING/XCLAIM or XREADGROUP, plus the attempt
count) and one completion script (HSETNX the line, counters, XACK, XDEL) besides its
admission. A worker killed mid-record leaves its entry pending; the next claim after
the lease takes it over (XPENDING IDLE + XCLAIM), attempts intact.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from proxy.backend.client import ResponseError
from proxy.backend.job_store import CHUNK, SUBMITTING, log, text
from proxy.backend.job_submit import RedisSubmits
from proxy.jobs.queue import (
    GROUP,
    BatchCompleted,
    BatchMeta,
    BatchRunning,
    Claimed,
    DeadLetter,
    Deleted,
    QueueUnavailable,
    ReplayOutcome,
    Stream,
)
from proxy.jobs.queue import pool_of as _pool_of

#: The batch id in a stored dead letter's JSON (orjson writes no spaces).
_BATCH_ID = re.compile(rb'"batchId":"([^"]*)"')
#: Index entries one sweep looks at, and dead letters one script call removes, at most.
_SWEEP_IDS = 500
_FORGET_CHUNK = 500
_REPLAY_OUTCOMES: dict[str, ReplayOutcome] = {
    "replayed": "replayed", "batch_cancelled": "batch_cancelled",
    "batch_gone": "batch_gone", "already_replayed": "already_replayed",
}  # fmt: skip


def _claimed(stream: Stream, res: Any) -> Claimed | None:
    """The claim script's reply ({id, flat fields, attempts} or nil) as a :class:`Claimed`."""
    if not res:
        return None
    entry_id, flat, attempts = res
    fields = {text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
    model = fields.get("m")
    return Claimed(
        stream=stream,
        entry_id=text(entry_id),
        batch_id=text(fields["b"]),
        record_id=text(fields["r"]),
        model_input=bytes(fields["i"]),
        model=text(model) if model else None,
        attempts=int(attempts),
    )


def _dead_letter(raw: bytes | str) -> DeadLetter:
    return DeadLetter.from_json(orjson.loads(raw))


class RedisQueue(RedisSubmits):
    """:class:`proxy.jobs.queue.JobQueue` on Redis or Redis Cluster."""

    async def start(self) -> None:
        """Warn when Redis would lose accepted records on a restart (no AOF)."""
        try:
            info = await self._call(self._client.config_get("appendonly"), "config get")
        except (QueueUnavailable, ResponseError):
            return  # managed Redis often forbids CONFIG; nothing to check then
        values = list(info.values()) if isinstance(info, dict) else []
        if values and all(text(v) != "yes" for v in values):
            log.warning(
                "redis has no AOF (appendonly no): batch records accepted since the last "
                "snapshot are lost if Redis restarts; set appendonly yes"
            )

    async def close(self) -> None:
        """Close the connection pool and the script runner's connections."""
        await self._runner.aclose()

    async def release(self, claimed: Claimed) -> None:
        """Uncount the attempt; the entry stays pending, so it is claimed again after its lease."""
        key = self._keys.stream(claimed.stream) + ":att"
        await self._call(self._client.hincrby(key, claimed.entry_id, -1), "release")

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
        return [text(k) for k in kept]

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

    async def batches(self, workload: str | None) -> list[BatchMeta]:
        """Newest first (at most 1,000); a batch still ``submitting`` is not listed yet."""
        ids = await self._call(self._client.zrevrange(self._keys.batches, 0, 999), "batches")
        metas = [await self.batch(text(i)) for i in ids]
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
        ids = [text(i) for i in raw]
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
            state = text(status) if status is not None else ""
            done = int(ok or 0) + int(err or 0)
            finished = records is not None and done >= int(records)
            if state == "cancelled" or (state != SUBMITTING and finished):
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
        ms = int(text(first[0][0]).split("-")[0])
        return int(length), max(0.0, time.time() - ms / 1000)

    async def drain_rate(self, stream: Stream) -> float:
        """The last six complete 10-second buckets, per second (Redis's clock)."""
        key = self._keys.stream(stream) + ":rate"
        now_s, _ = await self._call(self._client.time(), "rate")
        current = int(now_s) // 10
        h = await self._call(self._client.hgetall(key), "rate")
        done = sum(int(v) for k, v in h.items() if current - 6 <= int(text(k)) < current)
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
                workload, _, reason = text(field).partition("\t")
                counts[workload, reason] = counts.get((workload, reason), 0) + int(n)
        return counts

    async def discard(self, entries: list[DeadLetter]) -> list[DeadLetter]:
        """One script per pool and chunk: HDEL each entry, its count with it."""
        by_id = {e.dlq_id: e for e in entries}
        dropped: list[DeadLetter] = []
        for pool in sorted({e.pool for e in entries}):
            mine = [e for e in entries if e.pool == pool]
            tag = self._keys.tag(pool)
            for start in range(0, len(mine), CHUNK):
                args = [a for e in mine[start : start + CHUNK]
                        for a in (e.dlq_id, f"{e.workload}\t{e.reason}")]  # fmt: skip
                ids = await self._script("discard", [f"{tag}:dlq", f"{tag}:dlq:n"], args)
                dropped += [by_id[text(i)] for i in ids]
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
        outcome = _REPLAY_OUTCOMES.get(text(res))
        if outcome is None:
            raise QueueUnavailable(f"replay: unexpected reply {text(res)[:40]!r}")
        return outcome
