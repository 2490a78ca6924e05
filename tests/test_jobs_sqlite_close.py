"""Closing the embedded queue while worker threads still query it must not crash the process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.jobs.queue import BatchMeta, QueueUnavailable, Stream
from proxy.jobs.records import Record
from proxy.jobs.sqlite_queue import SqliteQueue


async def test_close_waits_for_queries_in_flight_and_later_calls_fail_cleanly(
    tmp_path: Path,
) -> None:
    queue = SqliteQueue(str(tmp_path / "jobs.sqlite3"))
    await queue.start()
    meta = BatchMeta("haiku:b1", "enrich", "haiku", "m", "invoke", 2000, 0)
    await queue.submit(meta, [Record(f"r{i}", b'{"x": 1}') for i in range(2000)])
    stream = Stream("haiku", "enrich")
    # Many queries in worker threads, and a close racing them: before the fix the close
    # ran on the event loop while a thread was inside SQLite (a segfault of the process).
    busy = [asyncio.ensure_future(queue.depth(stream)) for _ in range(32)]
    await asyncio.sleep(0)
    await queue.close()
    results = await asyncio.gather(*busy, return_exceptions=True)
    assert all(isinstance(r, tuple | QueueUnavailable) for r in results), results
    with pytest.raises(QueueUnavailable):
        await queue.depth(stream)
