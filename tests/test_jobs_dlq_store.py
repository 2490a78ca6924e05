"""Dead letters in both stores: counted without being read, discarded exactly once.

The ``sluice_dlq_records`` gauge is refreshed by every instance every few seconds; it used
to load and parse every dead letter to count them (20,000 of them stalled /healthz for
250 ms). A discard and a replay of the same dead letter race: exactly one may take it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.backend.job_queue import RedisQueue
from proxy.jobs.metrics import JobMetrics
from proxy.jobs.queue import BatchCompleted, BatchMeta, DeadLetter, JobQueue, Stream, new_id
from proxy.jobs.records import Record
from proxy.jobs.sqlite_queue import SqliteQueue
from tests.support.redis_fixtures import RedisServerProcess

#: (workload, reason) of the dead letters each test writes.
MIX = (
    [("enrich", "ValidationException")] * 120
    + [("enrich", "retries_exhausted")] * 50
    + [("ingest", "AccessDeniedException")] * 30
)


@pytest.fixture(params=["embedded", "redis"])
async def queue(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServerProcess
) -> AsyncIterator[JobQueue]:
    q: JobQueue
    if request.param == "redis":
        q = RedisQueue(redis_server.url, fleet=f"dlq-{uuid.uuid4().hex[:8]}")
    else:
        q = SqliteQueue(str(tmp_path / "jobs.sqlite3"))
    await q.start()
    yield q
    await q.close()


async def dead_letter_all(q: JobQueue, mix: list[tuple[str, str]]) -> list[DeadLetter]:
    """Submit one batch per workload and dead-letter each of its records as ``mix`` says."""
    out: list[DeadLetter] = []
    for workload in sorted({w for w, _ in mix}):
        reasons = [r for w, r in mix if w == workload]
        meta = BatchMeta(
            new_id("haiku"), workload, "haiku", "m", "invoke", len(reasons), int(time.time() * 1000)
        )
        await q.submit(meta, [Record(f"rec-{i:05d}", b'{"x": 1}') for i in range(len(reasons))])
        for reason in reasons:
            c = await q.claim(meta.stream, "test", 60_000)
            assert c is not None
            entry = DeadLetter(
                new_id("haiku"), c.batch_id, c.record_id, workload, "haiku", "m", reason,
                reason, "injected", 1, c.model_input, int(time.time() * 1000),
            )  # fmt: skip
            assert await q.dead_letter(c, entry, b'{"error": {}}')
            out.append(entry)
    return out


class CountsOnly:
    """The queue, except that loading every dead letter fails the test."""

    def __init__(self, q: JobQueue) -> None:
        self._q = q

    def __getattr__(self, name: str) -> Any:
        if name == "dead_letters":
            raise AssertionError("the gauge refresh loaded every dead letter")
        return getattr(self._q, name)


async def gauge(q: JobQueue, metrics: JobMetrics) -> Counter[tuple[str, str]]:
    streams = {Stream("haiku", "enrich"), Stream("haiku", "ingest")}
    await metrics.refresh(CountsOnly(q), streams)  # type: ignore[arg-type]
    got: Counter[tuple[str, str]] = Counter()
    for sample in metrics.dlq.collect()[0].samples:
        if sample.value:
            got[sample.labels["workload"], sample.labels["reason"]] = int(sample.value)
    return got


async def test_the_gauge_counts_dead_letters_without_loading_them_and_stays_exact(
    queue: JobQueue,
) -> None:
    entries = await dead_letter_all(queue, MIX)
    metrics = JobMetrics(CollectorRegistry())
    assert await gauge(queue, metrics) == Counter(MIX)

    validation = [e for e in entries if e.reason == "ValidationException"]
    for e in validation[:20]:
        assert await queue.replay(e, None) == "replayed"
    dropped = await queue.discard(validation[20:50] + validation[:5])  # 5 already replayed
    assert {e.dlq_id for e in dropped} == {e.dlq_id for e in validation[20:50]}
    ingest = [e for e in entries if e.workload == "ingest"]
    assert len(await queue.discard(ingest)) == 30

    want = Counter(MIX)
    want["enrich", "ValidationException"] -= 50
    del want["ingest", "AccessDeniedException"]
    assert await gauge(queue, metrics) == want
    assert Counter((d.workload, d.reason) for d in await queue.dead_letters()) == want
    # An emptied reason reads 0, so the alarm resolves instead of going stale.
    assert metrics.dlq.labels("ingest", "AccessDeniedException")._value.get() == 0


async def test_of_a_replay_and_a_discard_of_one_dead_letter_exactly_one_takes_it(
    queue: JobQueue,
) -> None:
    entries = await dead_letter_all(queue, [("enrich", "ValidationException")] * 60)
    outcomes = await asyncio.gather(
        *(asyncio.gather(queue.replay(e, None), queue.discard([e])) for e in entries)
    )
    for replayed, dropped in outcomes:
        # Replayed and not dropped, or dropped and left alone: never both, never neither.
        assert (replayed == "replayed") != bool(dropped), (replayed, dropped)
        assert replayed in ("replayed", "already_replayed")
    n_replayed = sum(r == "replayed" for r, _ in outcomes)
    meta = await queue.batch(entries[0].batch_id)
    assert meta is not None
    # Each replayed record is queued again without its error line; each dropped one kept it.
    assert (await queue.depth(meta.stream))[0] == n_replayed
    assert meta.failed == 60 - n_replayed
    assert await queue.dead_letters() == []
    assert await queue.dead_letter_counts() in ({}, {("enrich", "ValidationException"): 0})


async def test_an_embedded_file_from_before_counted_dead_letters_is_migrated(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE dlq (id TEXT PRIMARY KEY, doc TEXT)")
    for i, reason in enumerate(["ValidationException", "ValidationException", "WorkerLost"]):
        doc = {"id": f"haiku:{i}", "batchId": "haiku:b", "recordId": f"r{i}", "workload": "enrich",
               "pool": "haiku", "model": "m", "reason": reason, "errorCode": reason,
               "errorMessage": "x", "attempts": 1, "modelInput": {}, "at": i}  # fmt: skip
        db.execute("INSERT INTO dlq VALUES (?, ?)", (doc["id"], json.dumps(doc)))
    db.commit()
    db.close()
    q = SqliteQueue(str(path))
    await q.start()
    try:
        assert await q.dead_letter_counts() == {
            ("enrich", "ValidationException"): 2,
            ("enrich", "WorkerLost"): 1,
        }
    finally:
        await q.close()


async def test_a_batch_whose_records_are_all_done_cannot_be_cancelled_by_the_store(
    queue: JobQueue,
) -> None:
    # The route checks first, but a batch can complete between that read and the cancel:
    # the store checks again with the mark, so its dead letters stay replayable.
    (done,) = await dead_letter_all(queue, [("enrich", "ValidationException")])
    meta = await queue.batch(done.batch_id)
    assert meta is not None and meta.status == "completed"
    with pytest.raises(BatchCompleted):
        await queue.cancel(done.batch_id)
    after = await queue.batch(done.batch_id)
    assert after is not None and after.status == "completed"
    # A batch with a record still to run is cancelled, and cancelling it again is fine.
    running = BatchMeta(
        new_id("haiku"), "enrich", "haiku", "m", "invoke", 2, int(time.time() * 1000)
    )
    await queue.submit(running, [Record(f"rec-{i}", b'{"x": 1}') for i in range(2)])
    for _ in range(2):
        cancelled = await queue.cancel(running.batch_id)
        assert cancelled is not None and cancelled.status == "cancelled"


async def test_the_sweep_expires_batches_that_finished_without_an_expiry(
    redis_server: RedisServerProcess,
) -> None:
    # Batches that finished before retention existed (or on an older instance) have no TTL:
    # the sweep gives finished ones one, never a running one; an expired batch's dead letters
    # go, found a page at a time among others' (not every dead letter loaded at once).
    import redis as sync_redis

    q = RedisQueue(redis_server.url, fleet=f"ret-{uuid.uuid4().hex[:8]}", retention_s=lambda: 60.0)
    await q.start()
    client = sync_redis.Redis.from_url(redis_server.url)
    try:
        letters = await dead_letter_all(q, [("enrich", "ValidationException")] * 3)
        finished = letters[0].batch_id
        running = BatchMeta(
            new_id("haiku"), "enrich", "haiku", "m", "invoke", 2, int(time.time() * 1000)
        )
        await q.submit(running, [Record(f"rec-{i}", b'{"x": 1}') for i in range(2)])
        keys = {b: q._keys.batch("haiku", b) for b in (finished, running.batch_id)}
        client.persist(keys[finished])  # as a release before retention left it
        client.persist(keys[finished] + ":out")
        await q.sweep()
        assert 0 < client.pttl(keys[finished]) <= 60_000
        assert 0 < client.pttl(keys[finished] + ":out") <= 60_000
        assert client.pttl(keys[running.batch_id]) == -1
        others = await dead_letter_all(q, [("ingest", "AccessDeniedException")] * 2)
        client.delete(keys[finished], keys[finished] + ":out")  # its expiry ran out
        await q.sweep()
        left = await q.dead_letters()
        assert {d.dlq_id for d in left} == {d.dlq_id for d in others}
        counts = {k: n for k, n in (await q.dead_letter_counts()).items() if n}  # (0s stay)
        assert counts == {("ingest", "AccessDeniedException"): 2}
    finally:
        client.close()
        await q.close()
