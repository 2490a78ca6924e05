"""The durable queue for one embedded instance: a SQLite file (WAL, synchronous=FULL).

Same contract as the Redis queue: a ``202`` means the records are committed to disk;
a record is held under a lease (``owner``, ``lease_until``) that a later claim takes
over once expired; the output line is inserted only if none exists (one per
recordId). The file is created on the first submit, so instances that never take a
batch leave nothing behind. SQLite calls run in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import orjson

from proxy.jobs.queue import (
    DEFAULT_RETENTION_S,
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
)
from proxy.jobs.records import Record

T = TypeVar("T")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
  id TEXT PRIMARY KEY, workload TEXT, pool TEXT, model TEXT, inv TEXT, records INTEGER,
  created INTEGER, ok INTEGER DEFAULT 0, err INTEGER DEFAULT 0, in_tok INTEGER DEFAULT 0,
  out_tok INTEGER DEFAULT 0, status TEXT DEFAULT 'running');
CREATE TABLE IF NOT EXISTS records (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, pool TEXT, workload TEXT, batch TEXT,
  record_id TEXT, input BLOB, model TEXT, enq INTEGER, owner TEXT,
  lease_until INTEGER DEFAULT 0, attempts INTEGER DEFAULT 0);
CREATE INDEX IF NOT EXISTS records_stream ON records (pool, workload, seq);
-- A purge finds a batch's rows through these, not by scanning every record and letter.
CREATE INDEX IF NOT EXISTS records_batch ON records (batch);
CREATE TABLE IF NOT EXISTS outputs (
  batch TEXT, record_id TEXT, line BLOB, PRIMARY KEY (batch, record_id));
CREATE TABLE IF NOT EXISTS dlq (id TEXT PRIMARY KEY, doc TEXT, workload TEXT, reason TEXT);
CREATE INDEX IF NOT EXISTS dlq_batch ON dlq (json_extract(doc, '$.batchId'));
CREATE TABLE IF NOT EXISTS rate (
  pool TEXT, workload TEXT, bucket INTEGER, n INTEGER, PRIMARY KEY (pool, workload, bucket));
"""
#: The gauge counts dead letters from this index alone, never reading a document.
_DLQ_INDEX = "CREATE INDEX IF NOT EXISTS dlq_counts ON dlq (workload, reason)"
_META_COLUMNS = "id, workload, pool, model, inv, records, created, ok, err, status, in_tok, out_tok"
#: Rows one retention or delete transaction removes at most: the file's lock is held for
#: a few milliseconds at a time, so workers' claims and completions go on between them.
_CHUNK_ROWS = 5000
#: Batches one retention sweep removes at most (the next sweep takes the rest).
_SWEEP_BATCHES = 50
#: Free pages one sweep gives back to the file system at most (4 KiB pages: 16 MiB).
_VACUUM_PAGES = 4096
#: A batch's row while its rows are being removed: answered as gone by every route, and
#: finished by the next sweep if the process dies half-way.
_DELETED = "deleted"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _meta(row: tuple[Any, ...]) -> BatchMeta:
    bid, workload, pool, model, inv, records, created, ok, err, status, in_tok, out_tok = row
    return BatchMeta(
        bid, workload, pool, model, "converse" if inv == "converse" else "invoke", records,
        created, ok, err, status == "cancelled", in_tok, out_tok, status == "submitting",
    )  # fmt: skip


class SqliteQueue:
    """:class:`proxy.jobs.queue.JobQueue` in one SQLite file."""

    def __init__(
        self, path: str, retention_s: Callable[[], float] = lambda: DEFAULT_RETENTION_S
    ) -> None:
        self.path = path
        self._retention_s = retention_s
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._closed = False

    async def start(self) -> None:
        """Open the file if a previous run created it (records survive restarts)."""
        if await asyncio.to_thread(os.path.exists, self.path):
            await self._run(lambda db: None)

    async def close(self) -> None:
        """Close the file once no query runs on it (a query may still run in a thread)."""
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        # Under the lock: closing a connection another thread is using crashes the process
        # (seen as a segfault when an app shut down while a worker's claim was running).
        with self._lock:
            self._closed = True
            if self._db is not None:
                self._db.close()
                self._db = None

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            # Only takes on a new file, and before WAL writes its header: an older file
            # keeps its mode (its freed pages are reused, so it stops growing, it just
            # does not shrink).
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            _add_dlq_columns(db)
            _add_finished(db)
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def work() -> T:
            with self._lock:
                if self._closed:
                    raise sqlite3.ProgrammingError("the queue is closed (shutting down)")
                db = self._open()
                db.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(db)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                return result

        try:
            return await asyncio.to_thread(work)
        except sqlite3.Error as exc:
            raise QueueUnavailable(f"sqlite {self.path}: {exc}") from None

    async def _read(self, fn: Callable[[sqlite3.Connection], T], empty: T) -> T:
        """Reads answer ``empty`` while no batch ever created the file."""
        if self._db is None and not await asyncio.to_thread(os.path.exists, self.path):
            return empty
        return await self._run(fn)

    async def submit(
        self, meta: BatchMeta, records: list[Record], max_queued: int | None = None
    ) -> None:
        """One transaction: the cap check, the batch row and every record (a failure rolls
        back all of it, so this store never has a ``submitting`` batch)."""
        now = _now_ms()

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
            now = _now_ms()
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
                (stream.pool, stream.workload, _now_ms()),
            ).fetchone()
            return row is not None

        return await self._read(fn, False)

    async def renew(
        self, stream: Stream, consumer: str, entry_ids: list[str], lease_ms: int
    ) -> list[str]:
        """Push the lease of records this consumer still owns."""

        def fn(db: sqlite3.Connection) -> list[str]:
            kept = []
            until = _now_ms() + lease_ms
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
                (c.batch_id, c.record_id, line, c.batch_id, _DELETED),
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
                (batch_id, _DELETED),
            ).fetchone()
            return _meta(row) if row else None

        return await self._read(fn, None)

    async def batches(self, workload: str | None) -> list[BatchMeta]:
        """Newest first."""

        def fn(db: sqlite3.Connection) -> list[BatchMeta]:
            rows = db.execute(
                f"SELECT {_META_COLUMNS} FROM batches WHERE status != ? "
                "ORDER BY created DESC LIMIT 1000",
                (_DELETED,),
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
                (_now_ms(), batch_id, _DELETED),
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

    async def delete(self, batch_id: str) -> Deleted | None:
        """Mark the batch deleted (gone for every route at once), then remove its rows a
        chunk at a time; refused while it runs."""

        def fn(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT status, records - ok - err FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
            if row is None or row[0] in (_DELETED, "submitting"):
                return False
            if row[0] == "running" and row[1] > 0:
                raise BatchRunning(batch_id)
            db.execute("UPDATE batches SET status = ? WHERE id = ?", (_DELETED, batch_id))
            return True

        if not await self._read(fn, False):
            return None
        deleted = await self._purge(batch_id)
        await self._vacuum()
        return deleted

    async def sweep(self) -> int:
        """Delete up to :data:`_SWEEP_BATCHES` batches finished longer than the retention ago
        (and finish deletes a dead process left half-done), then give free pages back."""
        cutoff = _now_ms() - int(self._retention_s() * 1000)
        due: list[tuple[str, str]] = await self._read(
            lambda db: db.execute(
                "SELECT id, status FROM batches WHERE finished <= ? OR status = ? LIMIT ?",
                (cutoff, _DELETED, _SWEEP_BATCHES),
            ).fetchall(),
            [],
        )
        removed = 0
        for batch_id, state in due:
            if state != _DELETED:
                if not await self._run(lambda db, b=batch_id: _expire(db, b, cutoff)):  # type: ignore[misc]
                    continue  # replayed since it was looked at: running again
                removed += 1
            await self._purge(batch_id)
        if due:
            await self._vacuum()
        return removed

    async def _vacuum(self) -> None:
        """Give freed pages back to the file system (a file made with incremental auto-vacuum)."""

        def work() -> None:
            with self._lock:
                if self._closed or self._db is None:
                    return
                if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
                    # executescript steps the pragma to its end (execute frees one page),
                    # in its own transaction: hence outside _run.
                    self._db.executescript(f"PRAGMA incremental_vacuum({_VACUUM_PAGES});")

        try:
            await asyncio.to_thread(work)
        except sqlite3.Error as exc:
            raise QueueUnavailable(f"sqlite {self.path}: {exc}") from None

    async def _purge(self, batch_id: str) -> Deleted:
        """Remove a batch marked deleted: outputs and records in chunks, then its dead
        letters and the row itself (last, so a sweep finds what a crash left)."""
        lines = await self._chunks("outputs", batch_id)
        queued = await self._chunks("records", batch_id)

        def last(db: sqlite3.Connection) -> int:
            n = db.execute(
                "DELETE FROM dlq WHERE json_extract(doc, '$.batchId') = ?", (batch_id,)
            ).rowcount
            db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
            return int(n)

        return Deleted(lines, queued, await self._run(last))

    async def _chunks(self, table: str, batch_id: str) -> int:
        """Delete a batch's rows of ``table`` (outputs or records), a chunk per transaction."""
        sql = (
            f"DELETE FROM {table} WHERE rowid IN "
            f"(SELECT rowid FROM {table} WHERE batch = ? LIMIT {_CHUNK_ROWS})"
        )
        total = 0
        while True:
            n: int = await self._run(lambda db: db.execute(sql, (batch_id,)).rowcount)
            total += n
            if n < _CHUNK_ROWS:
                return total

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
            if found is None or found[0] == _DELETED:
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
                 entry.model_input, model, _now_ms()),
            )  # fmt: skip
            # Running again: its retention starts over once it completes again.
            db.execute("UPDATE batches SET finished = NULL WHERE id = ?", (entry.batch_id,))
            return "replayed"

        return await self._run(fn)


def _add_dlq_columns(db: sqlite3.Connection) -> None:
    """Files written before dead letters were counted by column get the columns, filled
    from their documents (once), and the index the gauge reads."""
    db.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(dlq)")}
        if "workload" not in columns:
            db.execute("ALTER TABLE dlq ADD COLUMN workload TEXT")
            db.execute("ALTER TABLE dlq ADD COLUMN reason TEXT")
        db.execute(_DLQ_INDEX)
        # On every open, not only when the columns are added: rows an older binary wrote
        # since (a downgrade, a file shared during an upgrade) would count as "None".
        db.execute(
            "UPDATE dlq SET workload = json_extract(doc, '$.workload'), "
            "reason = json_extract(doc, '$.reason') WHERE workload IS NULL OR reason IS NULL"
        )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _dead_letter(doc: str) -> DeadLetter:
    return DeadLetter.from_json(orjson.loads(doc))


def _add_finished(db: sqlite3.Connection) -> None:
    """``batches.finished`` (when it completed or was cancelled: retention runs from it),
    added to a file made before retention; its finished batches count from now."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(batches)")}
    if "finished" not in columns:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ALTER TABLE batches ADD COLUMN finished INTEGER")
        db.execute(
            "UPDATE batches SET finished = ? WHERE status = 'cancelled' OR ok + err >= records",
            (_now_ms(),),
        )
        db.execute("COMMIT")
    db.execute("CREATE INDEX IF NOT EXISTS batches_finished ON batches (finished)")


def _mark_finished(db: sqlite3.Connection, batch_id: str) -> None:
    """Stamp a batch's finish the moment its last record gets its line."""
    db.execute(
        "UPDATE batches SET finished = ? WHERE id = ? AND finished IS NULL "
        "AND status = 'running' AND ok + err >= records",
        (_now_ms(), batch_id),
    )


def _expire(db: sqlite3.Connection, batch_id: str, cutoff: int) -> bool:
    """Mark a batch deleted if it is still past its retention; False when a replay has
    made it run again since the sweep looked."""
    cur = db.execute(
        "UPDATE batches SET status = ? WHERE id = ? AND finished <= ?",
        (_DELETED, batch_id, cutoff),
    )
    return cur.rowcount == 1
