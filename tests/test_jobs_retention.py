"""Deleting batches and their retention, on both stores (embedded SQLite and Redis).

The defect: nothing ever deleted batch state (every record's input and output stayed in
the Redis that also holds the quotas, or in an ever-growing SQLite file). Now a finished
batch can be deleted on request and is deleted ``server.jobs.retention_hours`` after it
finished, with its output lines and dead letters; a running one is never touched.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.backend.job_store import JobKeys as _Keys
from tests.support.jobs_helpers import (
    HAIKU_RT,
    call,
    dead_letters,
    jobs_policy,
    one_fleet,
    output,
    record,
    status,
    submit,
    wait_done,
    wait_until,
)
from tests.support.processes import ROOT, _env, metric_value

pytestmark = pytest.mark.slow


def bad_record(i: int) -> dict[str, Any]:
    """A record Bedrock refuses for good (no messages): dead-lettered at its first attempt."""
    doc = record(i)
    doc["recordId"] = f"bad-{i:05d}"
    doc["modelInput"]["messages"] = []
    return doc


@dataclass
class Store:
    """One of the two stores under a Sluice process, and a look at what it holds."""

    kind: str
    sluice: Any
    rows: Callable[[str], int]
    ttls: Callable[[str], list[int]]

    @property
    def url(self) -> str:
        return str(self.sluice.url)

    def deleted(self, why: str) -> float:
        """``sluice_batches_deleted_total{why}``."""
        return metric_value(self.sluice.metrics(), "sluice_batches_deleted_total", why=why)


@pytest.fixture(params=["embedded", "redis"])
def store_sluice(
    request: pytest.FixtureRequest, tmp_path: Path, make_simulator: Any, make_sluice: Any
) -> Callable[..., Store]:
    """``start(retention_hours=None)``: a simulator whose HAIKU_RT answers after ~80 s (a
    batch on it stays running), and one Sluice on the parametrized store."""
    sim = make_simulator(
        {"latency_scale": 0.02, "models": {HAIKU_RT: {"latency": {"latency_scale": 100}}}}
    )

    def start(retention_hours: float | None = None) -> Store:
        jobs: dict[str, Any] = {"sqlite_path": str(tmp_path / "jobs.sqlite3")}
        if retention_hours is not None:
            jobs["retention_hours"] = retention_hours
        policy = jobs_policy(jobs=jobs)
        if request.param == "embedded":
            sluice = make_sluice(upstream=sim.url, policy=policy)
            return Store("embedded", sluice, _sqlite_rows(jobs["sqlite_path"]), _no_ttl)
        redis = request.getfixturevalue("redis_factory")()
        fleet = one_fleet()
        sluice = make_sluice(upstream=sim.url, policy=policy, redis_url=redis.url, extra_args=fleet)
        keys = _Keys(fleet[1])
        return Store("redis", sluice, _redis_rows(redis, keys), _redis_ttls(redis, keys))

    return start


def _sqlite_rows(path: str) -> Callable[[str], int]:
    def rows(batch_id: str) -> int:
        """Rows of every table that still name the batch."""
        with sqlite3.connect(path) as db:
            return sum(
                db.execute(sql, (batch_id,)).fetchone()[0]
                for sql in (
                    "SELECT COUNT(*) FROM batches WHERE id = ?",
                    "SELECT COUNT(*) FROM outputs WHERE batch = ?",
                    "SELECT COUNT(*) FROM records WHERE batch = ?",
                    "SELECT COUNT(*) FROM dlq WHERE json_extract(doc, '$.batchId') = ?",
                )
            )

    return rows


def _no_ttl(batch_id: str) -> list[int]:
    return []


def _redis_rows(redis: Any, keys: _Keys) -> Callable[[str], int]:
    def rows(batch_id: str) -> int:
        """Keys named for the batch, its index entry, its dead letters in the pool's hash."""
        named = redis.cli("--scan", "--pattern", f"*batch:{batch_id}*").split()
        indexed = redis.cli("ZSCORE", keys.batches, batch_id).strip() != ""
        letters = redis.cli("HVALS", keys.tag("haiku") + ":dlq").count(batch_id)
        return len(named) + indexed + letters

    return rows


def _redis_ttls(redis: Any, keys: _Keys) -> Callable[[str], list[int]]:
    def ttls(batch_id: str) -> list[int]:
        """PTTL of the batch's hash and of its output hash (-1: none, -2: no such key)."""
        key = keys.batch(batch_id.partition(":")[0], batch_id)
        return [int(redis.cli("PTTL", k)) for k in (key, key + ":out")]

    return ttls


def _mixed(base: str) -> str:
    """A batch of 3 good records and 2 dead-lettered ones, run to completion."""
    batch_id = submit(base, [record(0), record(1), record(2), bad_record(3), bad_record(4)])
    done = wait_done(base, batch_id)
    assert (done["succeeded"], done["failed"]) == (3, 2), done
    return batch_id


def _running(base: str) -> str:
    """A batch that keeps running for the whole test (its model answers after ~80 s)."""
    batch_id = submit(base, [record(i) for i in range(2)], model=HAIKU_RT)
    assert status(base, batch_id)["status"] == "running"
    return batch_id


def _error(raw: bytes, headers: dict[str, str]) -> tuple[str, str]:
    return headers["x-amzn-ErrorType"].partition(":")[0], json.loads(raw)["message"]


def test_delete_removes_a_finished_batch_and_refuses_a_running_one(
    store_sluice: Callable[..., Store],
) -> None:
    store = store_sluice()
    base = store.url
    finished, running = _mixed(base), _running(base)
    assert len(dead_letters(base, f"?batch={finished}")) == 2

    code, headers, raw = call(base, "DELETE", f"/batches/{running}")
    assert code == 400
    kind, message = _error(raw, headers)
    assert kind == "ConflictException"
    assert f"batch '{running}' is running" in message and "cancel it first" in message
    assert status(base, running)["status"] == "running"  # untouched

    # Another workload's batch does not exist for it, as on every batch route.
    code, headers, _ = call(base, "DELETE", f"/batches/{finished}", workload="checkout")
    assert code == 404 and _error(_, headers)[0] == "ResourceNotFoundException"

    code, _, raw = call(base, "DELETE", f"/batches/{finished}")
    assert code == 200, raw
    assert json.loads(raw) == {
        "batchId": finished,
        "status": "deleted",
        "deleted": {"outputLines": 5, "queuedRecords": 0, "deadLetters": 2},
    }
    assert store.rows(finished) == 0
    assert call(base, "GET", f"/batches/{finished}")[0] == 404
    assert call(base, "GET", f"/batches/{finished}/output")[0] == 404
    assert dead_letters(base, f"?batch={finished}") == []
    code, _, raw = call(base, "GET", "/batches")
    assert [b["batchId"] for b in json.loads(raw)["batches"]] == [running]
    code, headers, raw = call(base, "DELETE", f"/batches/{finished}")  # again
    assert code == 404 and _error(raw, headers) == (
        "ResourceNotFoundException",
        f"batch '{finished}' not found for workload 'enrich'",
    )

    # Cancelled first, the running batch can go, through the CLI.
    assert call(base, "POST", f"/batches/{running}/cancel")[0] == 200
    cli = subprocess.run(
        [sys.executable, "-m", "proxy", "batch", "delete", running, "--url", base,
         "--workload", "enrich"],
        capture_output=True, env=_env(None), cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["deleted"]["outputLines"] == 0
    assert call(base, "GET", f"/batches/{running}")[0] == 404
    assert store.rows(running) == 0

    assert store.deleted("request") == 2 and store.deleted("retention") == 0
    rejected = metric_value(
        store.sluice.metrics(), "sluice_rejections_total", reason="ConflictException"
    )
    assert rejected == 1


def test_retention_deletes_a_finished_batch_with_its_output_and_dead_letters(
    store_sluice: Callable[..., Store],
) -> None:
    store = store_sluice(retention_hours=0.001)  # 3.6 s
    base = store.url
    running = _running(base)
    finished = _mixed(base)
    if store.kind == "redis":
        # Expiring at the moment it finished: its hash and its output both, by Redis itself.
        batch_ttl, out_ttl = store.ttls(finished)
        assert 0 < batch_ttl <= 3600 and 0 < out_ttl <= 3600, (batch_ttl, out_ttl)
        assert store.ttls(running) == [-1, -2]  # (no output yet: its hash only)
    assert len(dead_letters(base, f"?batch={finished}")) == 2

    wait_until(lambda: store.rows(finished) == 0, 30, "the finished batch was not deleted")
    assert call(base, "GET", f"/batches/{finished}")[0] == 404
    assert dead_letters(base, f"?batch={finished}") == []
    code, _, raw = call(base, "GET", "/batches")
    assert code == 200 and [b["batchId"] for b in json.loads(raw)["batches"]] == [running]
    assert status(base, running)["status"] == "running"
    if store.kind == "redis":
        assert store.ttls(running)[0] == -1
    wait_until(lambda: store.deleted("retention") == 1, 10, "the deletion was not counted")
    assert store.deleted("request") == 0


@pytest.mark.long  # ~11 s a store; make test-all runs it
def test_a_replayed_batch_does_not_expire_while_it_runs_and_a_cancelled_one_does(
    store_sluice: Callable[..., Store],
) -> None:
    store = store_sluice(retention_hours=0.001)
    base = store.url
    # Dead-lettered for its model (one Bedrock does not have), not for its input.
    finished = submit(base, [record(0), record(1)], model="anthropic.nope-v1:0")
    assert wait_done(base, finished)["failed"] == 2
    code, _, raw = call(base, "POST", f"/dlq/replay?batch={finished}&modelId={HAIKU_RT}")
    assert code == 200 and json.loads(raw)["replayed"] == 2
    # Its replayed records take ~80 s: well past the retention, it must still be there.
    if store.kind == "redis":
        assert store.ttls(finished)[0] == -1  # (its output hash emptied: gone)
    time.sleep(6)  # retention (3.6 s) plus a sweep or more
    assert status(base, finished)["status"] == "running"
    assert output(base, finished) == []  # the error lines went with the replay
    assert store.deleted("retention") == 0
    # Cancelled, it is finished again: deleted a retention after the cancel.
    assert call(base, "POST", f"/batches/{finished}/cancel")[0] == 200
    if store.kind == "redis":
        assert 0 < store.ttls(finished)[0] <= 3600
    wait_until(lambda: store.rows(finished) == 0, 30, "the cancelled batch was not deleted")
    assert call(base, "GET", f"/batches/{finished}")[0] == 404
