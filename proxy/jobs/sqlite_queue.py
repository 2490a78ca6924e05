"""The durable queue for one embedded instance: a SQLite file (WAL, synchronous=FULL).

Same contract as the Redis queue: a ``202`` means the records are committed to disk;
a record is held under a lease (``owner``, ``lease_until``) that a later claim takes
over once expired; the output line is inserted only if none exists (one per
recordId). The file is created on the first submit, so instances that never take a
batch leave nothing behind. SQLite calls run in a thread, never on the event loop.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from proxy.jobs.queue import (
    BatchCompleted,
    BatchMeta,
    Claimed,
    DeadLetter,
    QueueFull,
    ReplayOutcome,
    Stream,
)
from proxy.jobs.records import Record
from proxy.jobs.sqlite_file import DELETED, now_ms
from proxy.jobs.sqlite_retention import SqliteRetention

_META_COLUMNS = "id, workload, pool, model, inv, records, created, ok, err, status, in_tok, out_tok"


def _meta(row: tuple[Any, ...]) -> BatchMeta:
    bid, workload, pool, model, inv, records, created, ok, err, status, in_tok, out_tok = row
    return BatchMeta(
        bid, workload, pool, model, "converse" if inv == "converse" else "invoke", records,
        created, ok, err, status == "cancelled", in_tok, out_tok, status == "submitting",
    )  # fmt: skip


class SqliteQueue(SqliteRetention):
    """:class:`proxy.jobs.queue.JobQueue` in one SQLite file."""

    async def submit(
        self, meta: BatchMeta, records: list[Record], max_queued: int | None = None
    ) -> None:
        """One transaction: the cap check, the batch row and every record (a failure rolls
        back all of it, so this store never has a ``submitting`` batch)."""
        now = now_ms()

        def fn(db: sqlite3.Connection) -> None:
            if max_queued is not None:
                # Inside the write transaction (BEGIN IMMEDIATE): two submits cannot both
                # see the room only one of them fits in.
                (queued,) = db.execute(
                    "SELECT COUNT(*) FROM records WHERE workload = ?", (meta.workload,)
                ).fetchone()
                if queued + len(records) > max_queued:
                    raise QueueFull(int(queued))
            db.execute(
                "INSERT INTO batches (id, workload, pool, model, inv, records, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (meta.batch_id, meta.workload, meta.pool, meta.model, meta.invocation,
                 meta.records, meta.created_ms),
            )  # fmt: skip
            db.executemany(
                "INSERT INTO records (pool, workload, batch, record_id, input, enq) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(meta.pool, meta.workload, meta.batch_id, r.record_id, r.model_input, now)
                 for r in records],
            )  # fmt: skip

        await self._run(fn)

    async def streams(self) -> list[Stream]:
        """Distinct (pool, workload) of every batch."""
        rows: list[Any] = await self._read(
            lambda db: db.execute("SELECT DISTINCT pool, workload FROM batches").fetchall(), []
        )
        return sorted(Stream(p, w) for p, w in rows)

    async def claim(self, stream: Stream, consumer: str, lease_ms: int) -> Claimed | None:
        """The first record not leased (or whose lease expired); counts the attempt."""

        def fn(db: sqlite3.Connection) -> Claimed | None:
            now = now_ms()
            row = db.execute(
                "SELECT seq, batch, record_id, input, model, attempts FROM records "
                "WHERE pool = ? AND workload = ? AND (owner IS NULL OR lease_until < ?) "
                "ORDER BY seq LIMIT 1",
                (stream.pool, stream.workload, now),
            ).fetchone()
            if row is None:
                return None
            seq, batch, record_id, data, model, attempts = row
            db.execute(
                "UPDATE records SET owner = ?, lease_until = ?, attempts = attempts + 1 "
                "WHERE seq = ?",
                (consumer, now + lease_ms, seq),
            )
            return Claimed(stream, str(seq), batch, record_id, bytes(data), model, attempts + 1)

        return await self._read(fn, None)

    async def has_work(self, stream: Stream, lease_ms: int) -> bool:
        """A record not leased, or leased past its expiry."""

        def fn(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT 1 FROM records WHERE pool = ? AND workload = ? "
                "AND (owner IS NULL OR lease_until < ?) LIMIT 1",
                (stream.pool, stream.workload, now_ms()),
            ).fetchone()
            return row is not None

        return await self._read(fn, False)

    async def renew(
        self, stream: Stream, consumer: str, entry_ids: list[str], lease_ms: int
    ) -> list[str]:
        """Push the lease of records this consumer still owns."""

        def fn(db: sqlite3.Connection) -> list[str]:
            kept = []
            until = now_ms() + lease_ms
            for eid in entry_ids:
                cur = db.execute(
                    "UPDATE records SET lease_until = ? WHERE seq = ? AND owner = ?",
                    (until, int(eid), consumer),
                )
                if cur.rowcount:
                    kept.append(eid)
            return kept

        return await self._run(fn)

    async def next_attempt(self, claimed: Claimed) -> int:
        """Increment and return the record's attempts."""

        def fn(db: sqlite3.Connection) -> int:
            db.execute(
                "UPDATE records SET attempts = attempts + 1 WHERE seq = ?", (int(claimed.entry_id),)
            )
            row = db.execute(
                "SELECT attempts FROM records WHERE seq = ?", (int(claimed.entry_id),)
            ).fetchone()
            return int(row[0]) if row else claimed.attempts + 1

        return await self._run(fn)

    async def release(self, claimed: Claimed) -> None:
        """Uncount the attempt; the lease taken by the claim runs out, then it is claimed again."""
        await self._run(
            lambda db: db.execute(
                "UPDATE records SET attempts = MAX(0, attempts - 1) WHERE seq = ?",
                (int(claimed.entry_id),),
            )
        )

    async def abandon(self, batch_id: str) -> int | None:
        """Same contract as Redis's (a submit is one transaction, so only a batch row some
        other tool left ``submitting`` is ever found here)."""

        def fn(db: sqlite3.Connection) -> int | None:
            cur = db.execute(
                "DELETE FROM batches WHERE id = ? AND status = 'submitting'", (batch_id,)
            )
            if cur.rowcount == 0:
                return None
            return db.execute("DELETE FROM records WHERE batch = ?", (batch_id,)).rowcount

        return await self._read(fn, None)

    def _finish(
        self,
        db: sqlite3.Connection,
        c: Claimed,
        line: bytes | None,
        ok: bool,
        tokens: tuple[int, int],
    ) -> bool:
        new = False
        if line is not None:
            # Only while its batch exists: a record in flight as its (cancelled) batch was
            # deleted must not leave a line (or a dead letter) nothing would ever remove.
            cur = db.execute(
                "INSERT OR IGNORE INTO outputs (batch, record_id, line) SELECT ?, ?, ? "
                "WHERE EXISTS (SELECT 1 FROM batches WHERE id = ? AND status != ?)",
                (c.batch_id, c.record_id, line, c.batch_id, DELETED),
            )
            new = cur.rowcount == 1
        if new:
            column = "ok" if ok else "err"
            db.execute(
                f"UPDATE batches SET {column} = {column} + 1, in_tok = in_tok + ?, "
                "out_tok = out_tok + ? WHERE id = ?",
                (*tokens, c.batch_id),
            )
            db.execute(
                "INSERT INTO rate (pool, workload, bucket, n) VALUES (?, ?, ?, 1) "
                "ON CONFLICT (pool, workload, bucket) DO UPDATE SET n = n + 1",
                (c.stream.pool, c.stream.workload, int(time.time()) // 10),
            )
            _mark_finished(db, c.batch_id)
        db.execute("DELETE FROM records WHERE seq = ?", (int(c.entry_id),))
        return new

    async def complete(
        self, claimed: Claimed, line: bytes | None, ok: bool, tokens: tuple[int, int]
    ) -> bool:
        """Output line if none exists, counters, record deleted: one transaction."""
        return await self._run(lambda db: self._finish(db, claimed, line, ok, tokens))

    async def complete_and_claim(
        self,
        claimed: Claimed,
        line: bytes,
        tokens: tuple[int, int],
        consumer: str,
        lease_ms: int,
    ) -> tuple[bool, Claimed | None]:
        """:meth:`complete` then :meth:`claim` (one file, one process: no round trip to save)."""
        new = await self.complete(claimed, line, True, tokens)
        return new, await self.claim(claimed.stream, consumer, lease_ms)

    async def dead_letter(self, claimed: Claimed, entry: DeadLetter, line: bytes) -> bool:
        """The error line and the dead-letter row, one transaction."""

        def fn(db: sqlite3.Connection) -> bool:
            new = self._finish(db, claimed, line, False, (0, 0))
            if new:
                doc = orjson.dumps(entry.to_json()).decode()
                db.execute(
                    "INSERT INTO dlq (id, doc, workload, reason) VALUES (?, ?, ?, ?)",
                    (entry.dlq_id, doc, entry.workload, entry.reason),
                )
            return new

        return await self._run(fn)

    async def batch(self, batch_id: str) -> BatchMeta | None:
        """The batch row."""

        def fn(db: sqlite3.Connection) -> BatchMeta | None:
            row = db.execute(
                f"SELECT {_META_COLUMNS} FROM batches WHERE id = ? AND status != ?",
                (batch_id, DELETED),
            ).fetchone()
            return _meta(row) if row else None

        return await self._read(fn, None)

    async def batches(self, workload: str | None) -> list[BatchMeta]:
        """Newest first."""

        def fn(db: sqlite3.Connection) -> list[BatchMeta]:
            rows = db.execute(
                f"SELECT {_META_COLUMNS} FROM batches WHERE status != ? "
                "ORDER BY created DESC LIMIT 1000",
                (DELETED,),
            ).fetchall()
            return [_meta(r) for r in rows if workload in (None, r[1])]

        return await self._read(fn, [])

    async def output(self, batch_id: str) -> AsyncIterator[bytes]:
        """Output lines, in pages of 1,000."""
        after = ""
        while True:
            rows: list[Any] = await self._read(
                lambda db, a=after: db.execute(  # type: ignore[misc]
                    "SELECT record_id, line FROM outputs WHERE batch = ? AND record_id > ? "
                    "ORDER BY record_id LIMIT 1000",
                    (batch_id, a),
                ).fetchall(),
                [],
            )
            for _, line in rows:
                yield bytes(line)
            if len(rows) < 1000:
                return
            after = rows[-1][0]

    async def cancel(self, batch_id: str) -> BatchMeta | None:
        """Mark cancelled and delete the waiting records."""

        def fn(db: sqlite3.Connection) -> bool:
            # Not a batch whose records are all done (checked with the mark, in one
            # transaction: one completing as the cancel arrives stays completed). Its
            # retention runs from the cancel.
            marked = db.execute(
                "UPDATE batches SET status = 'cancelled', finished = COALESCE(finished, ?) "
                "WHERE id = ? AND status != ? AND (status = 'cancelled' OR ok + err < records)",
                (now_ms(), batch_id, DELETED),
            ).rowcount
            if marked:
                db.execute("DELETE FROM records WHERE batch = ? AND owner IS NULL", (batch_id,))
            return bool(marked)

        if not await self._run(fn):
            meta = await self.batch(batch_id)
            if meta is not None and meta.status == "completed":
                raise BatchCompleted(batch_id)
            return meta
        return await self.batch(batch_id)

    async def depth(self, stream: Stream) -> tuple[int, float]:
        """Count and oldest enqueue time of the stream's records."""

        def fn(db: sqlite3.Connection) -> tuple[int, float]:
            n, oldest = db.execute(
                "SELECT COUNT(*), MIN(enq) FROM records WHERE pool = ? AND workload = ?",
                (stream.pool, stream.workload),
            ).fetchone()
            return int(n), (max(0.0, time.time() - oldest / 1000) if oldest else 0.0)

        return await self._read(fn, (0, 0.0))

    async def drain_rate(self, stream: Stream) -> float:
        """The last six complete 10-second buckets, per second."""
        current = int(time.time()) // 10

        def fn(db: sqlite3.Connection) -> float:
            (n,) = db.execute(
                "SELECT COALESCE(SUM(n), 0) FROM rate WHERE pool = ? AND workload = ? "
                "AND bucket >= ? AND bucket < ?",
                (stream.pool, stream.workload, current - 6, current),
            ).fetchone()
            db.execute("DELETE FROM rate WHERE bucket < ?", (current - 60,))
            return int(n) / 60.0

        return await self._read(fn, 0.0)

    async def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        rows: list[Any] = await self._read(
            lambda db: db.execute("SELECT doc FROM dlq").fetchall(), []
        )
        return sorted((_dead_letter(r[0]) for r in rows), key=lambda d: d.at_ms)

    async def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        """COUNT per (workload, reason) from the ``dlq_counts`` index (no document read)."""
        rows: list[Any] = await self._read(
            lambda db: db.execute(
                "SELECT workload, reason, COUNT(*) FROM dlq GROUP BY workload, reason"
            ).fetchall(),
            [],
        )
        return {(w, r): int(n) for w, r, n in rows}

    async def discard(self, entries: list[DeadLetter]) -> list[DeadLetter]:
        """Delete the rows (one transaction); a row a replay deleted first is not counted."""

        def fn(db: sqlite3.Connection) -> list[DeadLetter]:
            delete = "DELETE FROM dlq WHERE id = ?"
            return [e for e in entries if db.execute(delete, (e.dlq_id,)).rowcount == 1]

        return await self._read(fn, [])

    async def dead_letter_by_id(self, dlq_id: str) -> DeadLetter | None:
        """One dead letter."""
        row = await self._read(
            lambda db: db.execute("SELECT doc FROM dlq WHERE id = ?", (dlq_id,)).fetchone(), None
        )
        return _dead_letter(row[0]) if row else None

    async def replay(self, entry: DeadLetter, model: str | None) -> ReplayOutcome:
        """Unless its batch is cancelled or gone: drop the dead letter and its error line,
        queue the record again (one transaction)."""

        def fn(db: sqlite3.Connection) -> ReplayOutcome:
            row = db.execute("SELECT status FROM batches WHERE id = ?", (entry.batch_id,))
            found = row.fetchone()
            if found is None or found[0] == DELETED:
                return "batch_gone"
            if found[0] == "cancelled":
                # A worker drops a cancelled batch's records without a line: replaying would
                # delete the error line and the dead letter, then lose the record for good.
                return "batch_cancelled"
            if db.execute("DELETE FROM dlq WHERE id = ?", (entry.dlq_id,)).rowcount == 0:
                return "already_replayed"
            cur = db.execute(
                "DELETE FROM outputs WHERE batch = ? AND record_id = ?",
                (entry.batch_id, entry.record_id),
            )
            if cur.rowcount:
                db.execute("UPDATE batches SET err = err - 1 WHERE id = ?", (entry.batch_id,))
            db.execute(
                "INSERT INTO records (pool, workload, batch, record_id, input, model, enq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (entry.pool, entry.workload, entry.batch_id, entry.record_id,
                 entry.model_input, model, now_ms()),
            )  # fmt: skip
            # Running again: its retention starts over once it completes again.
            db.execute("UPDATE batches SET finished = NULL WHERE id = ?", (entry.batch_id,))
            return "replayed"

        return await self._run(fn)


def _dead_letter(doc: str) -> DeadLetter:
    return DeadLetter.from_json(orjson.loads(doc))


def _mark_finished(db: sqlite3.Connection, batch_id: str) -> None:
    """Stamp a batch's finish the moment its last record gets its line."""
    db.execute(
        "UPDATE batches SET finished = ? WHERE id = ? AND finished IS NULL "
        "AND status = 'running' AND ok + err >= records",
        (now_ms(), batch_id),
    )
