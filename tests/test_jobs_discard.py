"""Dead letters can be given up for good, and the queue cap holds under concurrent submits.

Real simulator, Sluice and redis-server processes. Before the discard, a dead letter of a
permanent error (it fails again on every replay) or of a cancelled batch (replay skips it)
kept the SluiceDeadLetters alarm firing for ever. Before the cap was checked inside the
store's write, four concurrent submits of 40 records against a cap of 50 all got 202.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support.jobs_helpers import (
    HAIKU,
    call,
    dead_letters,
    jobs_policy,
    jsonl,
    output,
    record,
    status,
    submit,
    wait_done,
    wait_until,
)
from tests.support.processes import ROOT, _env, metric_value

pytestmark = pytest.mark.slow

NOPE = "anthropic.nope-v1:0"  # every record a ValidationException, dead-lettered at once
STORES = ["embedded", "redis"]


@pytest.fixture(params=STORES)
def start(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_factory: Any,
    make_simulator: Any,
    make_sluice: Any,
) -> Callable[..., Any]:
    """Starts a Sluice (``jobs_policy(**kw)``) on the embedded SQLite file or on a private
    redis-server, in front of a fast simulator."""

    def make(**kw: Any) -> Any:
        jobs = {"sqlite_path": str(tmp_path / "jobs.sqlite3"), **kw.pop("jobs", {})}
        redis_url = redis_factory().url if request.param == "redis" else None
        upstream = make_simulator({"latency_scale": 0.02}).url
        return make_sluice(
            upstream=upstream, policy=jobs_policy(jobs=jobs, **kw), redis_url=redis_url
        )

    return make


def dead_lettered(url: str, records: list[dict[str, Any]]) -> str:
    """A batch whose every record is dead-lettered (ValidationException); its id."""
    batch_id = submit(url, records, model=NOPE)
    assert wait_done(url, batch_id)["failed"] == len(records)
    return batch_id


def together(*calls: Callable[[], None]) -> None:
    """Run each call in a thread of its own; return once all are done."""
    threads = [threading.Thread(target=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def sluice_cli(url: str, *args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "dlq", *args, "--url", url, "--workload", "enrich"],
        capture_output=True, env=_env(None), cwd=ROOT, timeout=30, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)


def post_together(url: str, path: str, body: bytes, go: threading.Barrier) -> Any:
    """POST ``body`` but its last byte, wait for the other threads, then send it: the
    requests reach Sluice's handlers at once (as a fleet of producers' do, at worst)."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname or "", where.port, timeout=30)
    try:
        conn.putrequest("POST", "/sluice/v1" + path)
        conn.putheader("x-sluice-workload", "enrich")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body[:-1])
        go.wait()
        conn.send(body[-1:])
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def gauge(sluice: Any) -> float:
    return metric_value(sluice.metrics(), "sluice_dlq_records", reason="ValidationException")


@pytest.mark.long  # ~12 s a store: the gauge's period; make test-all runs it
def test_discarded_dead_letters_are_gone_for_good_and_the_alarm_clears(
    start: Callable[..., Any],
) -> None:
    sluice = start()
    first = dead_lettered(sluice.url, [record(i) for i in range(3)])
    second = dead_lettered(sluice.url, [record(i) for i in range(3, 6)])
    wait_until(lambda: gauge(sluice) == 6, 15, "the DLQ gauge never showed 6")

    one = dead_letters(sluice.url, f"?batch={first}")[0]["id"]
    # Another workload neither sees nor discards enrich's dead letters.
    code, headers, raw = call(sluice.url, "DELETE", f"/dlq/{one}", workload="checkout")
    assert code == 404 and headers["x-amzn-ErrorType"].startswith("ResourceNotFoundException")
    assert f"dead letter '{one}' not found for workload 'checkout'" in json.loads(raw)["message"]
    assert call(sluice.url, "POST", "/dlq/discard", workload="checkout")[2] == b'{"discarded":0}'

    code, _, raw = call(sluice.url, "DELETE", f"/dlq/{one}")
    assert (code, json.loads(raw)) == (200, {"discarded": 1})
    assert call(sluice.url, "DELETE", f"/dlq/{one}")[0] == 404
    code, _, raw = call(sluice.url, "POST", f"/dlq/discard?batch={first}")
    assert (code, json.loads(raw)) == (200, {"discarded": 2})
    assert sluice_cli(sluice.url, "discard", "--reason", "ValidationException") == {"discarded": 3}

    assert dead_letters(sluice.url) == []
    wait_until(lambda: gauge(sluice) == 0, 15, "the DLQ gauge never went back to 0")
    text = sluice.metrics()
    assert metric_value(text, "sluice_dlq_discarded_total", reason="ValidationException") == 6
    assert json.loads(call(sluice.url, "POST", "/dlq/replay")[2])["replayed"] == 0
    # The records keep their error lines: a discarded record is given up, not unrecorded.
    for batch_id in (first, second):
        assert (status(sluice.url, batch_id)["failed"]) == 3
        assert all("error" in line for line in output(sluice.url, batch_id))
    assert "dead letters discarded" in sluice.stderr()


def test_a_discard_racing_a_replay_never_both_replays_and_drops_a_record(
    start: Callable[..., Any],
) -> None:
    sluice = start()
    records = [record(i) for i in range(40)]
    batch_id = dead_lettered(sluice.url, records)
    answers: dict[str, Any] = {}
    go = threading.Barrier(2)

    def run(path: str) -> None:
        go.wait()
        answers[path] = json.loads(call(sluice.url, "POST", path)[2])

    together(lambda: run(f"/dlq/replay?modelId={HAIKU}"), lambda: run("/dlq/discard"))
    replayed = answers[f"/dlq/replay?modelId={HAIKU}"]
    discarded = answers["/dlq/discard"]["discarded"]
    assert replayed["replayed"] + discarded == 40, answers
    # (a replay that lists after the discard ended does not see those at all)
    assert replayed["skippedReasons"].get("already_replayed", 0) <= discarded
    done = wait_done(sluice.url, batch_id)
    assert (done["succeeded"], done["failed"]) == (replayed["replayed"], discarded)
    lines = output(sluice.url, batch_id)
    assert Counter(line["recordId"] for line in lines) == Counter(r["recordId"] for r in records)
    assert dead_letters(sluice.url) == []


def test_concurrent_submits_never_queue_past_the_cap(start: Callable[..., Any]) -> None:
    sluice = start(batch={"max_queued_records": 50}, jobs={"enabled": False})
    submit(sluice.url, [record(i) for i in range(10)])
    body = jsonl([record(i) for i in range(30)])
    go = threading.Barrier(8)
    answers: list[tuple[int, dict[str, str], bytes]] = []

    def one() -> None:
        answers.append(post_together(sluice.url, f"/batches?modelId={HAIKU}", body, go))

    together(*[one] * 8)
    # 10 queued + 30 fit under 50; any second batch of 30 would not.
    codes = sorted(code for code, _, _ in answers)
    assert codes == [202] + [429] * 7, [raw[:200] for _, _, raw in answers]
    for code, headers, raw in answers:
        if code == 429:
            assert headers["x-amzn-ErrorType"].startswith("ThrottlingException")
            assert int(headers["Retry-After"]) >= 1
            assert "batch.max_queued_records (50)" in json.loads(raw)["message"]
    # The refused submits held no room once answered: exactly the 10 left still fit.
    submit(sluice.url, [record(i) for i in range(10)])
    assert call(sluice.url, "POST", f"/batches?modelId={HAIKU}", body=jsonl([record(0)]))[0] == 429
    text = sluice.metrics()
    assert metric_value(text, "sluice_rejections_total", reason="ThrottlingException") == 8
