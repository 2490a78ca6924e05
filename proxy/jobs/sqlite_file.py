"""The batch queue's SQLite file: its schema and migrations, and every query run in a
thread under one lock, never on the event loop (:mod:`.sqlite_queue` has the contract).

The file is created on the first submit, so instances that never take a batch leave
nothing behind; it is WAL with ``synchronous=FULL`` (a ``202`` is on disk) and incremental
auto-vacuum (retention gives pages back, :mod:`.sqlite_retention`).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from proxy.jobs.queue import DEFAULT_RETENTION_S, QueueUnavailable

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
#: A batch's row while its rows are being removed: answered as gone by every route, and
#: finished by the next sweep if the process dies half-way.
DELETED = "deleted"


def now_ms() -> int:
    return int(time.time() * 1000)


class SqliteFile:
    """One SQLite file, opened on first use; queries in a thread, one at a time."""

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


def _add_finished(db: sqlite3.Connection) -> None:
    """``batches.finished`` (when it completed or was cancelled: retention runs from it),
    added to a file made before retention; its finished batches count from now."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(batches)")}
    if "finished" not in columns:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ALTER TABLE batches ADD COLUMN finished INTEGER")
        db.execute(
            "UPDATE batches SET finished = ? WHERE status = 'cancelled' OR ok + err >= records",
            (now_ms(),),
        )
        db.execute("COMMIT")
    db.execute("CREATE INDEX IF NOT EXISTS batches_finished ON batches (finished)")
