"""Batch records run only where, when and as often as the workload was promised.

Three holes a review found, each with real simulator, Sluice and (where it matters)
redis-server processes: a dead-letter replay naming a model the workload's ``models:``
allow-list forbids (and a reload narrowing that list after submit); a Redis submit that
fails half-way (``maxmemory``) leaving records a worker later ran, besides the client's
retry; and a replay into a cancelled batch losing the record for good.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.backend.job_queue import RedisQueue
from proxy.jobs.queue import BatchMeta, QueueUnavailable, SubmitOutcomeUnknown
from proxy.jobs.records import Record
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
from tests.support.processes import metric_value
from tests.support.redis_fixtures import RedisServerProcess

pytestmark = pytest.mark.slow

SONNET = "anthropic.claude-3-5-sonnet-20241022-v2:0"
#: An unknown simulator directive: a permanent ValidationException, dead-lettered at once.
BAD = "[[sim:no_such_directive=1]]"


def two_pools(models: list[str], **kw: Any) -> dict[str, Any]:
    """:func:`jobs_policy` with a ``sonnet`` pool too, and ``enrich`` allowed only ``models``."""
    policy = jobs_policy(**kw)
    policy["models"]["sonnet"] = {"ids": [SONNET], "concurrency": 20}
    policy["workloads"]["enrich"]["models"] = models
    return policy


def requests_to(sim: Any, model: str) -> int:
    return int(sim.stats()["models"].get(model, {}).get("requests", 0))


def stored_batch(
    redis: Any, fleet: str, batch_id: str, state: str, records: int, created: int
) -> list[str]:
    """A batch of workload ``enrich`` on ``haiku`` written straight into Redis, as a submit
    (or what one leaves behind) writes it; returns its records' stream entry ids."""
    stream = f"sluice:{{haiku}}:fleet:{fleet}:jobs:enrich"
    redis.cli("xgroup", "create", stream, "sluice-workers", "0", "mkstream")
    redis.cli(
        "hset", f"sluice:{{haiku}}:fleet:{fleet}:batch:{batch_id}", "workload", "enrich",
        "pool", "haiku", "model", HAIKU, "inv", "invoke", "records", str(records),
        "created", str(created), "status", state,
    )  # fmt: skip
    redis.cli("zadd", f"sluice:fleet:{fleet}:jobs:batches", str(created), batch_id)
    entries = []
    for i in range(records):
        body = json.dumps(record(i)["modelInput"])
        added = redis.cli("xadd", stream, "*", "b", batch_id, "r", f"rec-{i:05d}", "i", body)
        entries.append(added.strip())
    redis.cli("sadd", f"sluice:fleet:{fleet}:jobs:streams", "haiku\tenrich")
    return entries


def message(raw: bytes) -> str:
    return str(json.loads(raw)["message"])


def test_replay_onto_a_model_the_workload_may_not_call_is_refused_like_a_submit(
    tmp_path: Path, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator({"latency_scale": 0.02})
    policy = two_pools(["haiku"], jobs={"sqlite_path": str(tmp_path / "jobs.sqlite3")})
    sluice = make_sluice(upstream=sim.url, policy=policy)
    batch_id = submit(sluice.url, [record(i, BAD) for i in range(3)])
    assert wait_done(sluice.url, batch_id)["failed"] == 3
    assert len(dead_letters(sluice.url)) == 3

    for model in (SONNET, "anthropic.claude-unknown-v9:0"):
        sub_code, sub_headers, sub_raw = call(
            sluice.url, "POST", f"/batches?modelId={model}", body=jsonl([record(0)])
        )
        code, headers, raw = call(sluice.url, "POST", f"/dlq/replay?modelId={model}")
        # Exactly the submit's refusal: status, Bedrock error type and message.
        assert code == sub_code == 403
        assert message(raw) == message(sub_raw)
        assert headers["x-amzn-ErrorType"] == sub_headers["x-amzn-ErrorType"]
        assert headers["x-amzn-ErrorType"].startswith("AccessDeniedException")
        assert "may not call model pool" in message(raw)
    assert "'sonnet'" in message(call(sluice.url, "POST", f"/dlq/replay?modelId={SONNET}")[2])

    # Nothing moved: the dead letters wait, sonnet was never called, the refusals counted.
    assert len(dead_letters(sluice.url)) == 3
    assert status(sluice.url, batch_id)["failed"] == 3
    time.sleep(1.0)
    assert requests_to(sim, SONNET) == 0
    text = sluice.metrics()
    assert metric_value(text, "sluice_rejections_total", reason="AccessDeniedException") == 5

    # An allowed model replays as before (the input still fails: dead-lettered again).
    code, _, raw = call(sluice.url, "POST", f"/dlq/replay?modelId={HAIKU}")
    assert code == 200 and json.loads(raw)["replayed"] == 3
    wait_until(lambda: len(dead_letters(sluice.url)) == 3 and requests_to(sim, HAIKU) == 6, 30)
    assert requests_to(sim, SONNET) == 0


def test_a_record_whose_model_a_reload_forbade_is_dead_lettered_not_sent(
    tmp_path: Path, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator({"latency_scale": 0.02})
    path = tmp_path / "policy.yaml"
    policy = two_pools(["haiku", "sonnet"], jobs={"sqlite_path": str(tmp_path / "jobs.sqlite3")})
    # Held in the queue by a closed schedule until the reload below.
    policy["workloads"]["enrich"]["schedule"] = {
        "windows": [{"start": "00:00", "end": "24:00", "concurrency": 0}]
    }
    path.write_text(yaml.safe_dump(policy))
    sluice = make_sluice(upstream=sim.url, policy=str(path))
    batch_id = submit(sluice.url, [record(i) for i in range(3)], model=SONNET)
    assert status(sluice.url, batch_id)["queueDepth"] == 3

    narrowed = two_pools(["haiku"], jobs={"sqlite_path": str(tmp_path / "jobs.sqlite3")})
    path.write_text(yaml.safe_dump(narrowed))
    reloaded = time.monotonic()
    done = wait_done(sluice.url, batch_id)
    # Woken by the reload, not after the closed window's Retry-After (30 s and more).
    assert time.monotonic() - reloaded < 15
    assert (done["succeeded"], done["failed"]) == (0, 3)
    assert requests_to(sim, SONNET) == 0
    dlq = dead_letters(sluice.url)
    assert {(d["reason"], d["errorCode"]) for d in dlq} == {
        ("AccessDeniedException", "AccessDeniedException")
    }
    assert "may not call model pool 'sonnet' (allowed: haiku" in dlq[0]["errorMessage"]
    assert {
        (line["error"]["errorCode"], line["error"]["errorType"])
        for line in output(sluice.url, batch_id)
    } == {(403, "AccessDeniedException")}
    assert (
        metric_value(sluice.metrics(), "sluice_batch_records_total", outcome="dead_lettered") == 3
    )


def test_a_submit_that_fails_half_way_leaves_nothing_to_run_and_its_retry_runs_once(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    redis = redis_factory("--maxmemory-policy", "noeviction")
    sim = make_simulator({"latency_scale": 0.01})
    sluice = make_sluice(upstream=sim.url, policy=jobs_policy(), redis_url=redis.url)
    # An earlier batch on the same pool and workload: its stream is known to the workers,
    # so anything the failed submit left in it would be drained at once.
    first = [record(i) for i in range(5)]
    first_id = submit(sluice.url, first)
    assert wait_done(sluice.url, first_id)["succeeded"] == 5

    records = [record(1000 + i, "x" * 8000) for i in range(300)]  # ~2.4 MB of stream
    used = int(redis.cli("info", "memory").split("used_memory:")[1].split()[0])
    redis.cli("config", "set", "maxmemory", str(used + 600_000))
    code, headers, raw = call(sluice.url, "POST", f"/batches?modelId={HAIKU}", body=jsonl(records))
    redis.cli("config", "set", "maxmemory", "0")
    assert code == 503, raw
    assert headers["x-amzn-ErrorType"].startswith("ServiceUnavailableException")
    assert headers["Retry-After"] == "1"
    refusal = message(raw)

    # Nothing is listed, nothing is left in the stream, nothing runs.
    time.sleep(3.0)  # more than a lease (2 s): a record a worker had set aside is back
    code, _, raw = call(sluice.url, "GET", "/batches")
    assert [b["batchId"] for b in json.loads(raw)["batches"]] == [first_id]
    stream_keys = [k for k in redis.cli("--scan", "--pattern", "*:jobs:enrich").split() if k]
    assert [redis.cli("xlen", k).strip() for k in stream_keys] == ["0"]
    assert requests_to(sim, HAIKU) == 5
    # The answer names the limit, and it did fail half-way (some records were written).
    assert "maxmemory" in refusal and "nothing was changed" in refusal
    assert "records)" in refusal and "(after 0 of" not in refusal

    # The client retries as told: each record runs exactly once.
    batch_id = submit(sluice.url, records)
    done = wait_done(sluice.url, batch_id)
    assert (done["succeeded"], done["failed"]) == (300, 0)
    lines = output(sluice.url, batch_id)
    assert Counter(line["recordId"] for line in lines) == Counter(r["recordId"] for r in records)
    time.sleep(3.0)
    assert requests_to(sim, HAIKU) == 305
    code, _, raw = call(sluice.url, "GET", "/batches")
    assert {(b["batchId"], b["status"]) for b in json.loads(raw)["batches"]} == {
        (first_id, "completed"),
        (batch_id, "completed"),
    }


def test_records_of_a_batch_never_fully_submitted_are_never_run(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    # What a submit leaves when Redis failed both the submit and its clean-up: the batch is
    # still `submitting`. A young one is a submit in progress: its records wait (they would
    # run twice if it then failed and was retried). One past the grace period died: its
    # records are dropped, counted and logged, never run.
    redis = redis_factory()
    sim = make_simulator({"latency_scale": 0.02})
    fleet = "leftover"
    stream = f"sluice:{{haiku}}:fleet:{fleet}:jobs:enrich"
    now_ms = int(time.time() * 1000)
    for batch_id, created in (("haiku:young", now_ms), ("haiku:dead", now_ms - 11 * 60_000)):
        stored_batch(redis, fleet, batch_id, "submitting", 2, created)

    sluice = make_sluice(
        upstream=sim.url, policy=jobs_policy(), redis_url=redis.url, extra_args=["--fleet", fleet]
    )
    wait_until(
        lambda: (
            metric_value(sluice.metrics(), "sluice_batch_records_total", outcome="abandoned") == 2
        ),
        15,
        "the dead submit's records were never abandoned",
    )
    assert redis.cli("exists", f"sluice:{{haiku}}:fleet:{fleet}:batch:haiku:dead").strip() == "0"
    assert "batch abandoned" in sluice.stderr()
    time.sleep(5.0)  # two leases and more: the young batch's records are claimed, set aside
    assert requests_to(sim, HAIKU) == 0
    assert redis.cli("xlen", stream).strip() == "2"
    code, _, raw = call(sluice.url, "GET", "/batches")
    assert json.loads(raw) == {"batches": []}
    code, _, _ = call(sluice.url, "GET", "/batches/haiku:young")
    assert code == 404

    # Its submit finishes: the records run, once each, with their first attempt.
    redis.cli("hset", f"sluice:{{haiku}}:fleet:{fleet}:batch:haiku:young", "status", "running")
    done = wait_done(sluice.url, "haiku:young")
    assert (done["succeeded"], done["failed"]) == (2, 0)
    assert requests_to(sim, HAIKU) == 2
    text = sluice.metrics()
    assert metric_value(text, "sluice_batch_attempts_total", reason="first") == 2
    assert metric_value(text, "sluice_batch_attempts_total", reason="redelivered") == 0


def test_a_record_taken_over_past_max_attempts_is_dead_lettered_not_sent(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    # What a record that kills (or stalls) its worker every time leaves behind: delivered
    # again and again, its attempt count growing, and never failing in a way the retry
    # loop sees. Past batch.max_attempts it is dead-lettered without another call.
    redis = redis_factory()
    sim = make_simulator({"latency_scale": 0.02})
    fleet = "poison"
    stream = f"sluice:{{haiku}}:fleet:{fleet}:jobs:enrich"
    (entry,) = stored_batch(redis, fleet, "haiku:poison", "running", 1, int(time.time() * 1000))
    redis.cli("hset", stream + ":att", entry, "3")  # three takeovers already (max_attempts 3)

    sluice = make_sluice(
        upstream=sim.url,
        policy=jobs_policy(batch={"max_attempts": 3}),
        redis_url=redis.url,
        extra_args=["--fleet", fleet],
    )
    done = wait_done(sluice.url, "haiku:poison")
    assert (done["succeeded"], done["failed"]) == (0, 1)
    assert requests_to(sim, HAIKU) == 0
    (dead,) = dead_letters(sluice.url)
    assert (dead["reason"], dead["errorCode"], dead["attempts"]) == (
        "retries_exhausted",
        "WorkerLost",
        3,
    )
    assert "reached 3 attempts, the last one interrupted" in dead["errorMessage"]


@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_a_dead_letter_of_a_cancelled_batch_is_not_replayed_and_not_lost(
    store: str, tmp_path: Path, redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator({"latency_scale": 0.1})
    policy = jobs_policy(jobs={"sqlite_path": str(tmp_path / "jobs.sqlite3")})
    redis_url = redis_factory().url if store == "redis" else None
    sluice = make_sluice(upstream=sim.url, policy=policy, redis_url=redis_url)
    # Cancelled while running: one record already dead-lettered, one still at the model
    # (~3 s for 4,096 tokens at this latency scale). A completed batch cannot be cancelled.
    slow = record(1, "[[sim:output_tokens=4096]] go", max_tokens=4096)
    batch_id = submit(sluice.url, [record(0, BAD), slow])
    wait_until(lambda: status(sluice.url, batch_id)["failed"] == 1, 30)
    code, _, raw = call(sluice.url, "POST", f"/batches/{batch_id}/cancel")
    assert code == 200, raw
    # The call in flight finishes and keeps its line.
    wait_until(lambda: status(sluice.url, batch_id)["succeeded"] == 1, 30)

    code, _, raw = call(sluice.url, "POST", f"/dlq/replay?batch={batch_id}")
    assert code == 200
    assert json.loads(raw) == {
        "replayed": 0,
        "skipped": 1,
        "skippedReasons": {"batch_cancelled": 1},
    }
    time.sleep(1.0)  # a wrongly requeued record would be dropped by now
    (dead,) = dead_letters(sluice.url)
    assert dead["recordId"] == "rec-00000"
    doc = status(sluice.url, batch_id)
    assert (doc["status"], doc["succeeded"], doc["failed"]) == ("cancelled", 1, 1)
    lines = {line["recordId"]: line for line in output(sluice.url, batch_id)}
    assert set(lines) == {"rec-00000", "rec-00001"} and "error" in lines["rec-00000"]
    text = sluice.metrics()
    assert metric_value(text, "sluice_dlq_replay_skipped_total", reason="batch_cancelled") == 1
    assert metric_value(text, "sluice_batch_records_total", outcome="cancelled") == 0


@pytest.mark.parametrize("case", ["flip ran", "flip did not run", "abandoned", "unknown"])
async def test_a_submit_whose_last_step_fails_stands_goes_whole_or_says_it_cannot_tell(
    redis_server: RedisServerProcess, case: str
) -> None:
    """The final flip to running fails on the client side (a timeout). If Redis ran it, the
    batch may be running already: the submit stands (undoing it would run its records again
    after the client's retry). If it did not, or a worker had abandoned the batch, nothing of
    it remains and the client is told to retry. If the store cannot say, nothing is removed
    and the client is told to look before resubmitting."""
    fleet = f"lost-{case.replace(' ', '-')}"
    queue = RedisQueue(redis_server.url, fleet=fleet)
    real = queue._script
    batch_key = f"sluice:{{haiku}}:fleet:{fleet}:batch:haiku:lost"

    async def last_step_fails(name: str, keys: list[str], args: list[Any]) -> Any:
        if name == "submit_state" and args == ["running"]:
            if case == "abandoned":  # a worker took the submit for dead just before
                redis_server.cli("del", batch_key)
            if case in ("flip ran", "unknown", "abandoned"):
                await real(name, keys, args)
            raise QueueUnavailable("submit: timed out (injected: the reply was lost)")
        if name == "submit_state" and case == "unknown":
            raise QueueUnavailable("submit: timed out (injected: the store stopped answering)")
        return await real(name, keys, args)

    queue._script = last_step_fails  # type: ignore[method-assign]
    meta = BatchMeta("haiku:lost", "enrich", "haiku", HAIKU, "invoke", 3, int(time.time() * 1000))
    records = [Record(f"r{i}", json.dumps(record(i)["modelInput"]).encode()) for i in range(3)]
    stream = f"sluice:{{haiku}}:fleet:{fleet}:jobs:enrich"
    try:
        if case == "flip ran":
            await queue.submit(meta, records)  # no error: the batch is complete and runs
            stored = await queue.batch("haiku:lost")
            assert stored is not None and not stored.submitting and stored.records == 3
            assert [m.batch_id for m in await queue.batches(None)] == ["haiku:lost"]
            assert redis_server.cli("xlen", stream).strip() == "3"
        elif case == "unknown":
            with pytest.raises(SubmitOutcomeUnknown):
                await queue.submit(meta, records)
            stored = await queue.batch("haiku:lost")  # untouched: it may be running
            assert stored is not None and not stored.submitting
            assert redis_server.cli("xlen", stream).strip() == "3"
        else:
            with pytest.raises(QueueUnavailable) as info:
                await queue.submit(meta, records)
            assert not isinstance(info.value, SubmitOutcomeUnknown)
            assert await queue.batch("haiku:lost") is None
            assert await queue.batches(None) == []
            assert redis_server.cli("xlen", stream).strip() == "0"
    finally:
        await queue.close()


def test_a_call_cut_by_a_graceful_stop_does_not_use_up_the_records_attempts(
    tmp_path: Path, make_simulator: Any, make_sluice: Any
) -> None:
    # max_attempts 1 and a deploy mid-call: the stop was Sluice's, not the record's doing.
    # The attempt is uncounted, so the next instance calls it (it is not dead-lettered as a
    # record that keeps killing its worker).
    sim = make_simulator({"latency_scale": 3.0})
    policy = jobs_policy(batch={"max_attempts": 1}, jobs={"sqlite_path": str(tmp_path / "q.db")})
    first = make_sluice(upstream=sim.url, policy=policy)
    batch_id = submit(first.url, [record(0, text="[[sim:output_tokens=300]]", max_tokens=400)])
    wait_until(lambda: requests_to(sim, HAIKU) >= 1, 15, "the call never started")
    first.stop()  # SIGTERM: graceful, the call in flight is cancelled
    second = make_sluice(upstream=sim.url, policy=policy)
    sim.configure({"latency_scale": 0.02})
    done = wait_done(second.url, batch_id)
    assert (done["succeeded"], done["failed"]) == (1, 0), dead_letters(second.url)
    assert requests_to(sim, HAIKU) == 2
