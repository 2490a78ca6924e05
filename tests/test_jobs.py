"""Durable batch jobs on Redis: real redis-server, simulator and Sluice processes.

Incidents 2 and 5 of scenarios.md: batch records drained inside the batch class's share
by every instance, never lost (kill -9, Redis restart with AOF), never duplicated,
throttles never dead-lettered while attempts remain, permanent errors dead-lettered at
once and replayable. The 2,000-record headline runs scaled down here (bench/ has it full).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections import Counter
from typing import Any

import pytest

from tests.support.jobs_helpers import (
    HAIKU,
    HAIKU_RT,
    call,
    dead_letters,
    jobs_policy,
    jsonl,
    one_fleet,
    output,
    record,
    status,
    submit,
    wait_done,
    wait_succeeded,
    wait_until,
)
from tests.support.load import Results, drive
from tests.support.processes import (
    UPSTREAM_KEY_ID,
    UPSTREAM_SECRET,
    Proc,
    _env,
    metric_value,
)

pytestmark = pytest.mark.slow


def assert_exactly_once(lines: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    counts = Counter(line["recordId"] for line in lines)
    assert set(counts) == {r["recordId"] for r in records}
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]


async def test_batch_drains_exactly_once_through_throttling_while_p0_keeps_answering(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    redis = redis_factory()
    sim = make_simulator(
        {"latency_scale": 0.02, "models": {HAIKU: {"faults": {"throttle_rate": 0.3}}}}
    )
    policy, joined = jobs_policy(), one_fleet()
    fleet = [
        make_sluice(upstream=sim.url, policy=policy, redis_url=redis.url, extra_args=joined)
        for _ in range(3)
    ]
    records = [record(i) for i in range(300)]
    batch_id = await asyncio.to_thread(submit, fleet[0].url, records)
    p0 = Results()
    await drive([p.url for p in fleet], "checkout", HAIKU_RT, clients=6, seconds=6, results=p0)
    done = await asyncio.to_thread(wait_done, fleet[0].url, batch_id)

    assert done["status"] == "completed" and done["succeeded"] == 300 and done["failed"] == 0
    assert_exactly_once(await asyncio.to_thread(output, fleet[1].url, batch_id), records)
    assert await asyncio.to_thread(dead_letters, fleet[2].url) == []
    assert p0.success_rate() >= 0.99, p0.kinds()
    assert p0.p99() < 2.0
    # The throttles happened, and they were retried by the application, not dead-lettered.
    texts = [p.metrics() for p in fleet]
    retried = sum(
        metric_value(t, "sluice_batch_attempts_total", reason="ThrottlingException") for t in texts
    )
    assert retried > 30
    # Every instance drained some of it: workers run in every `sluice serve`.
    per_instance = [
        metric_value(t, "sluice_batch_records_total", outcome="succeeded") for t in texts
    ]
    assert sum(per_instance) == 300 and min(per_instance) > 0


def test_worker_takes_records_only_within_the_workload_concurrency(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    redis = redis_factory()
    sim = make_simulator({"latency_scale": 0.2})
    policy, joined = jobs_policy(enrich_limits={"concurrency": 2}), one_fleet()
    fleet = [
        make_sluice(upstream=sim.url, policy=policy, redis_url=redis.url, extra_args=joined)
        for _ in range(2)
    ]
    records = [record(i) for i in range(24)]
    batch_id = submit(fleet[0].url, records)
    done = wait_done(fleet[0].url, batch_id)
    assert done["succeeded"] == 24
    assert sim.stats()["models"][HAIKU]["peak_concurrency"] <= 2
    refused = sum(
        metric_value(p.metrics(), "sluice_refused_total", workload="enrich") for p in fleet
    )
    assert refused > 0  # the slots asked and waited; they never sent a record past the cap


@pytest.mark.long
def test_kill_9_mid_batch_loses_nothing_and_writes_each_line_once(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    redis = redis_factory()
    sim = make_simulator({"latency_scale": 0.1})
    policy, joined = jobs_policy(), one_fleet()
    victim, survivor = (
        make_sluice(upstream=sim.url, policy=policy, redis_url=redis.url, extra_args=joined)
        for _ in range(2)
    )
    records = [record(i) for i in range(200)]
    batch_id = submit(victim.url, records)
    wait_succeeded(survivor.url, batch_id, 40)
    victim.kill(signal.SIGKILL)
    done = wait_done(survivor.url, batch_id)
    assert done["succeeded"] == 200 and done["failed"] == 0
    assert_exactly_once(output(survivor.url, batch_id), records)
    assert dead_letters(survivor.url) == []
    # The victim's records in flight were taken over after their lease, attempts intact.
    text = survivor.metrics()
    assert metric_value(text, "sluice_batch_attempts_total", reason="redelivered") >= 1


def test_redis_restart_with_aof_mid_batch_loses_nothing(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    redis = redis_factory("--appendonly", "yes", "--appendfsync", "always")
    sim = make_simulator({"latency_scale": 0.1})
    sluice = make_sluice(upstream=sim.url, policy=jobs_policy(), redis_url=redis.url)
    records = [record(i) for i in range(150)]
    batch_id = submit(sluice.url, records)
    wait_succeeded(sluice.url, batch_id, 30)
    redis.restart()
    done = wait_done(sluice.url, batch_id)
    assert done["succeeded"] == 150
    assert_exactly_once(output(sluice.url, batch_id), records)
    assert "no AOF" not in sluice.stderr()


def test_permanent_errors_dead_letter_at_first_attempt_and_replay_with_the_fixed_model(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    redis = redis_factory()
    sim = make_simulator({"latency_scale": 0.02})
    sluice = make_sluice(upstream=sim.url, policy=jobs_policy(), redis_url=redis.url)
    records = [record(i) for i in range(6)]
    batch_id = submit(sluice.url, records, model="anthropic.claude-nonexistent-v1:0")
    done = wait_done(sluice.url, batch_id)
    assert done["failed"] == 6 and done["status"] == "completed"
    errors = output(sluice.url, batch_id)
    assert {(e["error"]["errorCode"], e["error"]["errorType"]) for e in errors} == {
        (400, "ValidationException")
    }
    dlq = dead_letters(sluice.url, f"?batch={batch_id}")
    assert len(dlq) == 6
    assert {(d["reason"], d["attempts"]) for d in dlq} == {("ValidationException", 1)}
    assert "model identifier is invalid" in dlq[0]["errorMessage"]
    assert "dead-lettered" in sluice.stderr() and "synopsis" not in sluice.stderr()

    code, _, raw = call(
        sluice.url, "POST", f"/dlq/replay?reason=ValidationException&modelId={HAIKU}"
    )
    assert code == 200 and json.loads(raw) == {"replayed": 6, "skipped": 0, "skippedReasons": {}}
    done = wait_done(sluice.url, batch_id)
    assert done["succeeded"] == 6 and done["failed"] == 0
    lines = output(sluice.url, batch_id)
    assert_exactly_once(lines, records)
    assert all("modelOutput" in line for line in lines)
    assert dead_letters(sluice.url) == []


def test_retryable_errors_dead_letter_only_after_max_attempts(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    redis = redis_factory()
    sim = make_simulator({"latency_scale": 0.02})
    policy = jobs_policy(batch={"max_attempts": 3})
    sluice = make_sluice(upstream=sim.url, policy=policy, redis_url=redis.url)
    records = [record(i, "[[sim:fail=throttle]]" if i < 2 else "") for i in range(5)]
    batch_id = submit(sluice.url, records)
    done = wait_done(sluice.url, batch_id)
    assert (done["succeeded"], done["failed"]) == (3, 2)
    dlq = dead_letters(sluice.url, "?reason=retries_exhausted")
    assert sorted(d["recordId"] for d in dlq) == ["rec-00000", "rec-00001"]
    assert {(d["errorCode"], d["attempts"]) for d in dlq} == {("ThrottlingException", 3)}
    text = sluice.metrics()
    assert metric_value(text, "sluice_batch_attempts_total", reason="ThrottlingException") == 4
    wait_until(
        lambda: (
            metric_value(sluice.metrics(), "sluice_dlq_records", reason="retries_exhausted") == 2
        ),
        10,
        "the DLQ gauge never showed the dead letters",
    )


def test_submit_above_the_queue_cap_is_refused_with_retry_after(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    redis = redis_factory()
    sim = make_simulator({"latency_scale": 0.02})
    policy = jobs_policy(batch={"max_queued_records": 50}, jobs={"enabled": False})
    sluice = make_sluice(upstream=sim.url, policy=policy, redis_url=redis.url)
    submit(sluice.url, [record(i) for i in range(40)])
    code, headers, raw = call(
        sluice.url, "POST", f"/batches?modelId={HAIKU}", body=jsonl([record(i) for i in range(20)])
    )
    assert code == 429
    assert headers["x-amzn-ErrorType"].startswith("ThrottlingException")
    assert int(headers["Retry-After"]) >= 1
    assert "batch.max_queued_records (50)" in json.loads(raw)["message"]
    code, _, raw = call(
        sluice.url, "POST", f"/batches?modelId={HAIKU}", body=jsonl([record(i) for i in range(51)])
    )
    assert code == 400 and "split it" in json.loads(raw)["message"]
    assert (
        metric_value(sluice.metrics(), "sluice_rejections_total", reason="ThrottlingException") == 1
    )


def test_malformed_jsonl_is_refused_whole_with_its_line_number(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    redis = redis_factory()
    sim = make_simulator({"latency_scale": 0.02})
    policy = jobs_policy(jobs={"max_submit_bytes": 8192})
    sluice = make_sluice(upstream=sim.url, policy=policy, redis_url=redis.url)
    good = jsonl([record(0), record(1)])
    for body, expected in (
        (good + b'{"recordId": "x"}\n', "line 3: modelInput missing"),
        (good[:10] + b"\n" + good, "line 1: not valid JSON"),
        (good + b"\n" + json.dumps(record(1)).encode(), "line 4: recordId 'rec-00001' used twice"),
    ):
        code, headers, raw = call(sluice.url, "POST", f"/batches?modelId={HAIKU}", body=body)
        assert code == 400, raw
        assert headers["x-amzn-ErrorType"].startswith("ValidationException")
        assert expected in json.loads(raw)["message"]
    big = jsonl([record(i) for i in range(100)])
    code, _, raw = call(sluice.url, "POST", f"/batches?modelId={HAIKU}", body=big)
    assert code == 413 and "server.jobs.max_submit_bytes (8192 bytes)" in json.loads(raw)["message"]
    code, _, raw = call(sluice.url, "GET", "/batches")
    assert json.loads(raw) == {"batches": []}  # nothing was queued
    assert redis.cli("keys", "*jobs*").strip() == ""


def test_batch_belongs_to_the_submitting_workload_and_can_be_cancelled(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    redis = redis_factory()
    sim = make_simulator({"latency_scale": 0.02})
    policy = jobs_policy(jobs={"enabled": False})
    sluice = make_sluice(upstream=sim.url, policy=policy, redis_url=redis.url)
    batch_id = submit(sluice.url, [record(i) for i in range(10)])
    code, _, _ = call(sluice.url, "GET", f"/batches/{batch_id}", workload="checkout")
    assert code == 404
    doc = status(sluice.url, batch_id)
    assert doc["pending"] == 10 and doc["queueDepth"] == 10
    code, _, raw = call(sluice.url, "POST", f"/batches/{batch_id}/cancel")
    assert code == 200 and json.loads(raw)["status"] == "cancelled"
    assert status(sluice.url, batch_id)["queueDepth"] == 0


def test_schedule_holds_records_in_the_queue_and_sluice_worker_drains_alone(
    tmp_path: Any, redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    redis = redis_factory()
    sim = make_simulator({"latency_scale": 0.02})
    closed = jobs_policy()
    closed["workloads"]["enrich"]["schedule"] = {
        "windows": [{"start": "00:00", "end": "24:00", "concurrency": 0}]
    }
    # Outside any fleet (--no-fleet) each process runs its own file on the default queue.
    alone = ["--no-fleet"]
    held = make_sluice(upstream=sim.url, policy=closed, redis_url=redis.url, extra_args=alone)
    batch_id = submit(held.url, [record(i) for i in range(20)])
    wait_until(
        lambda: metric_value(held.metrics(), "sluice_refused_total", limit="schedule") >= 5, 10
    )
    assert status(held.url, batch_id)["queueDepth"] == 20
    assert sim.stats()["models"].get(HAIKU, {}).get("requests", 0) == 0
    held.stop()
    # `sluice worker` (no port) under an open policy drains what the closed one held back.
    policy_file = tmp_path / "open.yaml"
    policy_file.write_text(json.dumps(jobs_policy()))
    env = _env({"AWS_ACCESS_KEY_ID": UPSTREAM_KEY_ID, "AWS_SECRET_ACCESS_KEY": UPSTREAM_SECRET})
    cmd = [sys.executable, "-m", "proxy", "worker", "--config", str(policy_file),
           "--redis-url", redis.url, "--upstream", sim.url]  # fmt: skip
    worker = Proc("worker", cmd, tmp_path, env)
    try:
        wait_until(
            lambda: (
                sim.stats()["models"].get(HAIKU, {}).get("requests", 0) >= 20
                or worker.popen.poll() is not None
            ),
            30,
        )
        assert worker.popen.poll() is None, worker.stderr()
        reader = make_sluice(upstream=sim.url, policy=jobs_policy(jobs={"enabled": False}),
                             redis_url=redis.url, extra_args=alone)  # fmt: skip
        assert wait_done(reader.url, batch_id)["succeeded"] == 20
    finally:
        worker.stop()


def test_submit_while_redis_is_down_answers_a_bedrock_shaped_503(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    redis = redis_factory()
    sim = make_simulator({"latency_scale": 0.02})
    sluice = make_sluice(upstream=sim.url, policy=jobs_policy(), redis_url=redis.url)
    redis.kill()
    code, headers, raw = call(
        sluice.url, "POST", f"/batches?modelId={HAIKU}", body=jsonl([record(0)])
    )
    assert code == 503
    assert headers["x-amzn-ErrorType"].startswith("ServiceUnavailableException")
    assert headers["Retry-After"] == "1"
    assert "batch queue store is unreachable" in json.loads(raw)["message"]


def test_fleets_sharing_one_redis_never_take_each_others_records(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    # Same pool, model and workload in both fleets: only the fleet tells the queues apart.
    redis = redis_factory()
    sim_a, sim_b = make_simulator({"latency_scale": 0.02}), make_simulator({"latency_scale": 0.02})
    policy = jobs_policy()
    a = make_sluice(upstream=sim_a.url, policy=policy, redis_url=redis.url, extra_args=one_fleet())
    b = make_sluice(upstream=sim_b.url, policy=policy, redis_url=redis.url, extra_args=one_fleet())
    records = [record(i) for i in range(30)]
    batch_id = submit(a.url, records)
    assert wait_done(a.url, batch_id)["succeeded"] == 30
    assert_exactly_once(output(a.url, batch_id), records)
    # Fleet b's workers drained nothing of it, and its API does not know the batch.
    assert sim_a.stats()["models"][HAIKU]["requests"] == 30
    assert sim_b.stats()["models"].get(HAIKU, {}).get("requests", 0) == 0
    code, _, raw = call(b.url, "GET", f"/batches/{batch_id}")
    assert code == 404, raw
    code, _, raw = call(b.url, "GET", "/batches")
    assert code == 200 and batch_id not in raw.decode()


def test_the_default_fleet_keeps_the_original_key_names() -> None:
    # Records queued before fleets had queues of their own still drain after an upgrade.
    from proxy.backend.job_store import JobKeys as _Keys
    from proxy.jobs.queue import Stream

    for fleet in (None, "default"):
        keys = _Keys(fleet)
        assert keys.stream(Stream("haiku", "enrich")) == "sluice:{haiku}:jobs:enrich"
        assert keys.batch("haiku", "haiku:1") == "sluice:{haiku}:batch:haiku:1"
        assert (keys.streams, keys.batches) == ("sluice:jobs:streams", "sluice:jobs:batches")
    other = _Keys("eu")
    assert other.stream(Stream("haiku", "enrich")) == "sluice:{haiku}:fleet:eu:jobs:enrich"
    assert other.streams == "sluice:fleet:eu:jobs:streams"


def test_a_worker_first_in_its_fleet_publishes_its_own_file(
    tmp_path: Any, redis_factory: Any, make_simulator: Any
) -> None:
    # Before the fix `sluice worker --fleet` published the demo default policy as the
    # fleet's, which every later `serve` of that fleet then adopted.
    import asyncio as aio

    from proxy.backend.client import redis_client
    from proxy.backend.versions import PolicyVersions, sha_of

    redis = redis_factory()
    sim = make_simulator({"latency_scale": 0.02})
    policy_file = tmp_path / "mine.yaml"
    policy_file.write_text(json.dumps(jobs_policy()))
    env = _env({"AWS_ACCESS_KEY_ID": UPSTREAM_KEY_ID, "AWS_SECRET_ACCESS_KEY": UPSTREAM_SECRET})
    cmd = [sys.executable, "-m", "proxy", "worker", "--config", str(policy_file),
           "--redis-url", redis.url, "--upstream", sim.url, "--fleet", "eu"]  # fmt: skip
    worker = Proc("worker", cmd, tmp_path, env)

    async def stored() -> str | None:
        client = redis_client(redis.url, 1.0)
        try:
            version = await PolicyVersions(client, "eu").current()
            return None if version is None else version.sha
        finally:
            await client.aclose()

    try:
        wait_until(lambda: aio.run(stored()) is not None or worker.popen.poll() is not None, 20)
        assert worker.popen.poll() is None, worker.stderr()
        assert aio.run(stored()) == sha_of(policy_file.read_text())
    finally:
        worker.stop()
