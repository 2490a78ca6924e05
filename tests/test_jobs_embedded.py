"""Batch jobs without Redis: the embedded SQLite store, one instance, across a restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

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
from tests.support.processes import ROOT, _env

pytestmark = pytest.mark.slow


def test_embedded_store_keeps_accepted_records_across_a_restart(
    tmp_path: Path, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator({"latency_scale": 0.02})
    db = tmp_path / "jobs.sqlite3"
    records = [record(i) for i in range(30)]
    # First life: no workers, so every record is still queued when the process dies.
    first = make_sluice(
        upstream=sim.url, policy=jobs_policy(jobs={"enabled": False, "sqlite_path": str(db)})
    )
    batch_id = submit(first.url, records)
    first.kill(signal.SIGKILL)
    second = make_sluice(upstream=sim.url, policy=jobs_policy(jobs={"sqlite_path": str(db)}))
    done = wait_done(second.url, batch_id)
    assert done["succeeded"] == 30 and done["failed"] == 0
    assert sorted(line["recordId"] for line in output(second.url, batch_id)) == [
        r["recordId"] for r in records
    ]


def test_embedded_store_dead_letters_and_replays(
    tmp_path: Path, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator({"latency_scale": 0.02})
    policy = jobs_policy(jobs={"sqlite_path": str(tmp_path / "jobs.sqlite3")})
    sluice = make_sluice(upstream=sim.url, policy=policy)
    batch_id = submit(sluice.url, [record(i) for i in range(4)], model="anthropic.nope-v1:0")
    assert wait_done(sluice.url, batch_id)["failed"] == 4
    assert {d["reason"] for d in dead_letters(sluice.url)} == {"ValidationException"}
    replay = subprocess.run(
        [sys.executable, "-m", "proxy", "dlq", "replay", "--url", sluice.url,
         "--workload", "enrich", "--model", HAIKU],
        capture_output=True, env=_env(None), cwd=ROOT, timeout=30, check=True,
    )  # fmt: skip
    assert json.loads(replay.stdout) == {"replayed": 4, "skipped": 0, "skippedReasons": {}}
    done = wait_done(sluice.url, batch_id)
    assert (done["succeeded"], done["failed"]) == (4, 0)
    assert status(sluice.url, batch_id)["manifest"]["successRecordCount"] == 4


def test_cli_submit_waits_and_fetches_output_and_manifest(
    tmp_path: Path, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator({"latency_scale": 0.02})
    policy = jobs_policy(jobs={"sqlite_path": str(tmp_path / "jobs.sqlite3")})
    sluice = make_sluice(upstream=sim.url, policy=policy)
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl([record(i) for i in range(12)]))
    base = [sys.executable, "-m", "proxy", "batch"]
    common = ["--url", sluice.url, "--workload", "enrich"]
    run = subprocess.run(
        [*base, "submit", str(src), "--model", HAIKU, "--wait", *common],
        capture_output=True, env=_env(None), cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    batch_id = run.stdout.decode().strip()
    assert "12/12 done, 0 failed" in run.stderr.decode()  # plain progress lines off a terminal
    manifest = tmp_path / "manifest.json.out"
    out = subprocess.run(
        [*base, "output", batch_id, "--manifest", str(manifest), *common],
        capture_output=True, env=_env(None), cwd=ROOT, timeout=30, check=True,
    )  # fmt: skip
    assert len(out.stdout.decode().splitlines()) == 12
    counts = json.loads(manifest.read_text())
    assert counts["totalRecordCount"] == counts["successRecordCount"] == 12
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"modelInput": {}}\n{"recordId": "x"}\n')
    refused = subprocess.run(
        [*base, "submit", str(bad), "--model", HAIKU, *common],
        capture_output=True, env=_env(None), cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "line 2: modelInput missing" in refused.stderr.decode()


def test_cli_signs_with_a_sigv4_key_sluice_issued(
    tmp_path: Path, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator({"latency_scale": 0.02})
    policy = jobs_policy(jobs={"sqlite_path": str(tmp_path / "jobs.sqlite3")})
    policy["identity"] = {"header_mode": False}
    policy["workloads"]["enrich"]["access_keys"] = [
        {"access_key_id": "AKIDENRICH", "secret": {"env": "ENRICH_SECRET"}}
    ]
    sluice = make_sluice(upstream=sim.url, policy=policy, env={"ENRICH_SECRET": "s3cret"})
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl([record(i) for i in range(3)]))
    cmd = [sys.executable, "-m", "proxy", "batch", "submit", str(src), "--model", HAIKU,
           "--url", sluice.url, "--wait"]  # fmt: skip
    signed = _env({"AWS_ACCESS_KEY_ID": "AKIDENRICH", "AWS_SECRET_ACCESS_KEY": "s3cret"})
    run = subprocess.run(cmd, capture_output=True, env=signed, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    wrong = _env({"AWS_ACCESS_KEY_ID": "AKIDENRICH", "AWS_SECRET_ACCESS_KEY": "nope"})
    refused = subprocess.run(cmd, capture_output=True, env=wrong, cwd=ROOT, timeout=60)
    assert refused.returncode == 1
    assert "403 InvalidSignatureException" in refused.stderr.decode()


def test_a_record_with_an_absurd_output_cap_is_dead_lettered_and_locks_nothing(
    tmp_path: Path, make_simulator: Any, make_sluice: Any
) -> None:
    # The batch path reserves like a live call (fit.reserve): a record asking for 2**62 output
    # tokens on a pool without a declared ceiling can never fit the tokens/min bucket, so it
    # is a permanent ValidationException naming the limit; the records beside it, and P0
    # afterwards, are served as if it had never come.
    sim = make_simulator({"latency_scale": 0.02})
    policy = jobs_policy(
        jobs={"sqlite_path": str(tmp_path / "jobs.sqlite3")},
        pool={"tokens_per_minute": 200_000},
    )
    sluice = make_sluice(upstream=sim.url, policy=policy)
    records = [record(i) for i in range(6)] + [record(99, max_tokens=2**62)]
    batch_id = submit(sluice.url, records)
    done = wait_done(sluice.url, batch_id)
    assert (done["succeeded"], done["failed"]) == (6, 1)
    (dead,) = dead_letters(sluice.url)
    assert dead["recordId"] == "rec-00099" and dead["reason"] == "ValidationException"
    assert "tokens_per_minute" in json.dumps(dead) and "max_tokens" in json.dumps(dead)
    # Nothing was left in debt: a live P0 call on the same pool is admitted at once.
    req = urllib.request.Request(
        f"{sluice.url}/model/{HAIKU}/invoke",
        data=json.dumps(record(0)["modelInput"]).encode(),
        method="POST",
        headers={"x-sluice-workload": "checkout", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200


def test_credentials_rotated_under_a_running_batch_dead_letter_nothing(
    tmp_path: Path, make_simulator: Any, make_sluice: Any
) -> None:
    """Bedrock refuses the key Sluice signs with (revoked, rotated before the instance
    picked up the new one): every record gets UnrecognizedClientException. That is Sluice's
    signature, not the records: they wait with their backoff instead of being
    dead-lettered, and the batch completes once the key is accepted again."""
    from tests.support.processes import UPSTREAM_KEY_ID, UPSTREAM_SECRET

    sim = make_simulator(
        {"latency_scale": 0.02, "auth": {"access_key_id": "AKIDROTATED", "secret_access_key": "x"}}
    )
    policy = jobs_policy(
        batch={"max_attempts": 50, "base_backoff_ms": 50, "max_backoff_ms": 200},
        jobs={"sqlite_path": str(tmp_path / "jobs.sqlite3")},
    )
    sluice = make_sluice(upstream=sim.url, policy=policy)
    batch_id = submit(sluice.url, [record(i) for i in range(6)])

    def refused() -> int:
        stats = json.loads(urllib.request.urlopen(sim.url + "/_sim/stats", timeout=5).read())
        return sum(1 for r in stats["requests"] if r.get("status") == 403)

    wait_until(lambda: refused() >= 12, 30, "the simulator never refused Sluice's key")
    assert status(sluice.url, batch_id)["failed"] == 0
    assert dead_letters(sluice.url) == []
    wait_until(
        lambda: (
            "Bedrock refused Sluice's own credentials" in sluice.stderr()
            and "UnrecognizedClientException" in sluice.stderr()
        ),
        10,
        "the retries were never logged",
    )
    # Once a minute per batch and error, with the count: not a line per record and retry.
    assert sluice.stderr().count("Bedrock refused Sluice's own credentials") == 1
    patch = {"auth": {"access_key_id": UPSTREAM_KEY_ID, "secret_access_key": UPSTREAM_SECRET}}
    req = urllib.request.Request(
        sim.url + "/_sim/config", data=json.dumps(patch).encode(), method="POST"
    )
    urllib.request.urlopen(req, timeout=5).read()
    done = wait_done(sluice.url, batch_id)
    assert (done["succeeded"], done["failed"]) == (6, 0)
    assert dead_letters(sluice.url) == []


@pytest.mark.parametrize(
    "model",
    ["x%2F..%2F" + HAIKU, "x%2F.%2F" + HAIKU, "x%2F%2F" + HAIKU, "bad%20model", ".."],
)
def test_a_malformed_model_id_is_refused_by_submit_and_replay_naming_it(
    tmp_path: Path, make_simulator: Any, make_sluice: Any, model: str
) -> None:
    """The same modelId check as a live call's path: dot or empty segments (which URL
    normalisation would turn into another model than the one metered) and characters no
    model id has are a 400 naming ``modelId``, before anything is queued."""
    from tests.support.jobs_helpers import call

    sim = make_simulator({"latency_scale": 0.02})
    policy = jobs_policy(jobs={"sqlite_path": str(tmp_path / "jobs.sqlite3")})
    sluice = make_sluice(upstream=sim.url, policy=policy)
    for method, path, body in (
        ("POST", f"/batches?modelId={model}", jsonl([record(0)])),
        ("POST", f"/dlq/replay?modelId={model}", None),
    ):
        code, headers, raw = call(sluice.url, method, path, body=body)
        assert code == 400, (path, raw)
        assert headers["x-amzn-ErrorType"].startswith("ValidationException")
        assert "'modelId'" in json.loads(raw)["message"]
    code, _, raw = call(sluice.url, "GET", "/batches")
    assert code == 200 and json.loads(raw)["batches"] == []


def test_cli_wait_fails_on_a_cancelled_batch_and_a_completed_one_cannot_be_cancelled(
    tmp_path: Path, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator({"latency_scale": 0.02})
    policy = jobs_policy(jobs={"sqlite_path": str(tmp_path / "jobs.sqlite3")})
    # A schedule closed all day: the records wait in the queue until the batch is cancelled.
    policy["workloads"]["enrich"]["schedule"] = {
        "windows": [{"start": "00:00", "end": "24:00", "concurrency": 0}]
    }
    sluice = make_sluice(upstream=sim.url, policy=policy)
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl([record(i) for i in range(5)]))
    cmd = [sys.executable, "-m", "proxy", "batch", "submit", str(src), "--model", HAIKU,
           "--url", sluice.url, "--workload", "enrich", "--wait"]  # fmt: skip
    waiting = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(None), cwd=ROOT
    )
    try:
        batch_id = waiting.stdout.readline().decode().strip()  # type: ignore[union-attr]
        code, _, raw = call(sluice.url, "POST", f"/batches/{batch_id}/cancel")
        assert code == 200 and json.loads(raw)["status"] == "cancelled", raw
        _, err = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
    # `submit --wait && publish` must not publish a batch that never ran.
    assert waiting.returncode == 4, err
    assert f"{batch_id}: cancelled with 0 of 5 records done" in err.decode()

    open_all_day = jobs_policy(jobs={"sqlite_path": str(tmp_path / "jobs2.sqlite3")})
    served = make_sluice(upstream=sim.url, policy=open_all_day)
    done_id = submit(served.url, [record(i) for i in range(3)])
    assert wait_done(served.url, done_id)["status"] == "completed"
    code, headers, raw = call(served.url, "POST", f"/batches/{done_id}/cancel")
    assert code == 400 and headers["x-amzn-ErrorType"].startswith("ConflictException"), raw
    assert "already completed (3 succeeded, 0 failed): nothing to cancel" in raw.decode()
    assert status(served.url, done_id)["status"] == "completed"  # unchanged
