"""The batch queue on a 3-master Redis Cluster: every script stays in its pool's slot."""

from __future__ import annotations

import json
import signal
import uuid
from collections import Counter
from typing import Any

import pytest

from tests.support.jobs_helpers import (
    HAIKU,
    call,
    dead_letters,
    jobs_policy,
    one_fleet,
    output,
    record,
    submit,
    wait_done,
    wait_succeeded,
)

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_batch_drains_dead_letters_and_replays_on_a_cluster(
    redis_cluster: Any, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator(
        {"latency_scale": 0.02, "models": {HAIKU: {"faults": {"throttle_rate": 0.3}}}}
    )
    policy = jobs_policy()
    # The session cluster is shared: a pool name of its own keeps this test's keys apart.
    pool = f"haiku{uuid.uuid4().hex[:6]}"
    policy["models"] = {pool: policy["models"]["haiku"]}
    joined = one_fleet()
    fleet = [
        make_sluice(upstream=sim.url, policy=policy, redis_url=redis_cluster.url, extra_args=joined)
        for _ in range(2)
    ]
    records = [record(i) for i in range(80)]
    batch_id = submit(fleet[0].url, records)
    bad_id = submit(fleet[1].url, records[:3], model="anthropic.nope-v1:0")
    done = wait_done(fleet[1].url, batch_id)
    assert (done["succeeded"], done["failed"]) == (80, 0)
    assert sorted(line["recordId"] for line in output(fleet[0].url, batch_id)) == [
        r["recordId"] for r in records
    ]
    assert wait_done(fleet[0].url, bad_id)["failed"] == 3
    assert len(dead_letters(fleet[0].url, f"?batch={bad_id}")) == 3
    code, _, raw = call(fleet[0].url, "POST", f"/dlq/replay?batch={bad_id}&modelId={HAIKU}")
    assert code == 200 and json.loads(raw)["replayed"] == 3
    assert wait_done(fleet[0].url, bad_id)["succeeded"] == 3


@pytest.mark.long
def test_kill_9_mid_batch_on_a_cluster_loses_nothing(
    redis_cluster: Any, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator({"latency_scale": 0.1})
    policy = jobs_policy()
    pool = f"haiku{uuid.uuid4().hex[:6]}"
    policy["models"] = {pool: policy["models"]["haiku"]}
    joined = one_fleet()
    victim, survivor = (
        make_sluice(upstream=sim.url, policy=policy, redis_url=redis_cluster.url, extra_args=joined)
        for _ in range(2)
    )
    records = [record(i) for i in range(120)]
    batch_id = submit(victim.url, records)
    wait_succeeded(survivor.url, batch_id, 30)
    victim.kill(signal.SIGKILL)
    done = wait_done(survivor.url, batch_id)
    assert (done["succeeded"], done["failed"]) == (120, 0)
    counts = Counter(line["recordId"] for line in output(survivor.url, batch_id))
    assert set(counts) == {r["recordId"] for r in records} and max(counts.values()) == 1
