"""Deleting batches from the SQLite queue, on request and after ``server.jobs.retention_hours``:
a chunk of rows per transaction, so workers' claims go on between them, and the freed pages
given back to the file system.
"""

from __future__ import annotations

import asyncio
import sqlite3

from proxy.jobs.queue import BatchRunning, Deleted, QueueUnavailable
from proxy.jobs.sqlite_file import DELETED, SqliteFile, now_ms

#: Rows one retention or delete transaction removes at most: the file's lock is held for
#: a few milliseconds at a time, so workers' claims and completions go on between them.
_CHUNK_ROWS = 5000
#: Batches one retention sweep removes at most (the next sweep takes the rest).
_SWEEP_BATCHES = 50
#: Free pages one sweep gives back to the file system at most (4 KiB pages: 16 MiB).
_VACUUM_PAGES = 4096


class SqliteRetention(SqliteFile):
    """Delete and sweep (retention)."""

    async def delete(self, batch_id: str) -> Deleted | None:
        """Mark the batch deleted (gone for every route at once), then remove its rows a
        chunk at a time; refused while it runs."""

        def fn(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT status, records - ok - err FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
            if row is None or row[0] in (DELETED, "submitting"):
                return False
            if row[0] == "running" and row[1] > 0:
                raise BatchRunning(batch_id)
            db.execute("UPDATE batches SET status = ? WHERE id = ?", (DELETED, batch_id))
            return True

        if not await self._read(fn, False):
            return None
        deleted = await self._purge(batch_id)
        await self._vacuum()
        return deleted

    async def sweep(self) -> int:
        """Delete up to :data:`_SWEEP_BATCHES` batches finished longer than the retention ago
        (and finish deletes a dead process left half-done), then give free pages back."""
        cutoff = now_ms() - int(self._retention_s() * 1000)
        due: list[tuple[str, str]] = await self._read(
            lambda db: db.execute(
                "SELECT id, status FROM batches WHERE finished <= ? OR status = ? LIMIT ?",
                (cutoff, DELETED, _SWEEP_BATCHES),
            ).fetchall(),
            [],
        )
        removed = 0
        for batch_id, state in due:
            if state != DELETED:
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


def _expire(db: sqlite3.Connection, batch_id: str, cutoff: int) -> bool:
    """Mark a batch deleted if it is still past its retention; False when a replay has
    made it run again since the sweep looked."""
    cur = db.execute(
        "UPDATE batches SET status = ? WHERE id = ? AND finished <= ?",
        (DELETED, batch_id, cutoff),
    )
    return cur.rowcount == 1
