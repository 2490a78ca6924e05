"""What the controller and the breaker learn from: calls Bedrock refused before any model work
(400, 403, 404: bad input, no access) are no sample of a pool's health or load.

A caller's stream of malformed calls comes back in milliseconds; counted, it diluted the
breaker's failure share (real calls failing went unnoticed) and pulled the controller's p99
and mean call length down. Real Sluice and simulator processes, a real boto3 client.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from prometheus_client import CollectorRegistry

from proxy.backend.store import EmbeddedStore
from proxy.config import parse_policy
from proxy.control.breaker import CLOSED, HALF_OPEN, OPEN
from proxy.control.controller import Adaptivity, refused_before_model
from proxy.jobs.admit import RecordAdmission
from proxy.metrics import Metrics
from proxy.policy import CompiledPolicy, PolicyRef
from tests.support.admission_helpers import Backend, new_pool, until
from tests.support.processes import Simulator, Sluice, bedrock_client, metric_value

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


def _policy(pool: str) -> dict[str, Any]:
    breaker = {"threshold": 0.5, "window_seconds": 30, "min_requests": 10, "open_seconds": 60}
    return {
        "identity": {"default_workload": "default"},
        "models": {pool: {"ids": [HAIKU], "breaker": breaker}},
        "priorities": {"P0": {}},
        "workloads": {"default": {"priority": "P0"}},
    }


@pytest.fixture
def proxy(sim: Simulator, tmp_path: Path) -> Iterator[tuple[Sluice, str]]:
    pool = f"p{uuid.uuid4().hex[:8]}"
    p = Sluice(tmp_path, upstream=sim.url, policy=_policy(pool))
    yield p, pool
    p.stop()


def _call(client: Any, text: str) -> int:
    try:
        client.converse(modelId=HAIKU, messages=[{"role": "user", "content": [{"text": text}]}])
    except ClientError as exc:
        return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])
    return 200


def _breaker(proxy: Sluice, pool: str) -> float:
    return metric_value(proxy.metrics(), "sluice_breaker_state", pool=pool)


def test_fast_rejections_do_not_hide_a_failing_pool(proxy: tuple[Sluice, str]) -> None:
    sluice, pool = proxy
    client = bedrock_client(sluice.url)
    # 60 calls Bedrock rejects at once (an unknown simulator directive: ValidationException),
    # then 12 that fail on the server side: 12 of 72 is under the 50% threshold, 12 of 12 not.
    with ThreadPoolExecutor(8) as pool_:
        rejected = list(pool_.map(lambda _: _call(client, "[[sim:fail=bogus]]"), range(60)))
    assert rejected == [400] * 60
    assert _breaker(sluice, pool) == CLOSED
    failed = [_call(client, "[[sim:fail=internal]]") for _ in range(12)]
    # (Once 10 have failed the breaker may open: the rest get its 429.)
    assert failed.count(500) >= 10 and set(failed) <= {500, 429}, failed
    deadline = time.monotonic() + 5  # the breaker moves on the controller's next tick
    while _breaker(sluice, pool) != OPEN:
        assert time.monotonic() < deadline, "breaker stayed closed: the 400s were counted"
        time.sleep(0.05)
    # Open: Sluice answers for the pool itself, Bedrock-shaped, naming the breaker.
    try:
        client.converse(modelId=HAIKU, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    except ClientError as exc:
        body = exc.response["Error"]
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert "breaker" in json.dumps(body).lower()
    else:
        raise AssertionError("a call went to a pool whose breaker is open")


@pytest.mark.parametrize(
    ("status", "counted"),
    [
        *[(s, False) for s in (400, 403, 404, 413)],
        *[(s, True) for s in (408, 424, 429, 500, 503, 200)],
    ],
)
def test_which_answers_are_samples(status: int, counted: bool) -> None:
    # 408 (the model timed out) and 424 (the model failed) ran the model: their time counts.
    assert refused_before_model(status) is not counted


# --- the batch workers' path, and a half-open probe (in process, the fleet on a real store) --

Setup = tuple[str, Adaptivity, CollectorRegistry, CompiledPolicy]


@pytest.fixture
async def adaptivity(backend: Backend) -> AsyncIterator[Setup]:
    pool = new_pool()
    # (A window far longer than the test: none of its outcomes leave it meanwhile.)
    breaker = {"threshold": 0.5, "window_seconds": 60, "min_requests": 10, "open_seconds": 0.3}
    breaker["half_open_probes"] = 1
    policy = _policy(pool)
    policy["models"][pool]["breaker"] = breaker
    compiled = CompiledPolicy(parse_policy(policy), env={})
    registry = CollectorRegistry()
    a = Adaptivity(
        compiled, EmbeddedStore(), backend.url, registry=registry, tick_s=0.05, bucket_s=0.05
    )
    await a.start()
    try:
        yield pool, a, registry, compiled
    finally:
        await a.close()


def _state(registry: CollectorRegistry, pool: str) -> Any:
    return registry.get_sample_value("sluice_breaker_state", {"pool": pool})


async def test_batch_records_refused_before_model_work_are_no_sample(
    adaptivity: Setup,
) -> None:
    pool, a, registry, compiled = adaptivity
    records = RecordAdmission(PolicyRef(compiled), EmbeddedStore(), Metrics(), lambda: a)
    for _ in range(60):  # a job of malformed records: 400 each, in milliseconds
        records.observe(pool, "P0", 3.0, 400)
    await asyncio.sleep(0.3)  # a few ticks: the 400s would be in the window by now
    assert _state(registry, pool) == CLOSED
    for _ in range(12):  # then the records that reach the model fail
        records.observe(pool, "P0", 900.0, 500)
    await until(lambda: _state(registry, pool) == OPEN, 3.0)  # 12 of 12, not 12 of 72


async def test_a_half_open_probe_answered_with_a_refusal_counts_as_answered(
    adaptivity: Setup,
) -> None:
    pool, a, registry, _ = adaptivity
    for _ in range(10):
        a.observe(pool, "P0", 900.0, False, True)
    await until(lambda: _state(registry, pool) == HALF_OPEN)
    await until(lambda: a.breaker_allows(pool))  # the probe slot, claimed from the fleet
    # Bedrock answered the probe, with a 400 of the caller's: it is reachable, no sample of
    # the pool's load, and the episode is not left waiting for an outcome.
    a.observe(pool, "P0", 3.0, False, False, refused=True)
    await until(lambda: _state(registry, pool) == CLOSED)


# --- calls Bedrock never answered (Sluice's own 408 past the read timeout) ---------------


def _brownout_policy(pool: str) -> dict[str, Any]:
    adaptive = {"floor": 1, "initial": 2, "ceiling": 16, "interval_seconds": 0.5}
    adaptive |= {"target_p99_ms": 250, "increase": 2}
    return {
        "identity": {"default_workload": "default"},
        "server": {"upstream_read_timeout_seconds": 0.3, "adaptivity": {"tick_seconds": 0.1}},
        "models": {pool: {"ids": [HAIKU], "concurrency": 16, "adaptive": adaptive}},
        "priorities": {"P0": {}},
        "workloads": {"default": {"priority": "P0"}},
    }


def _limit_after_load(sim: Simulator, workdir: Path, hanging: bool) -> float:
    """8 callers for 4 s against an adaptive pool starting at 2; with ``hanging``, every
    other call is one Bedrock does not answer within Sluice's 0.3 s read timeout (the
    simulator's latency for 4,000 output tokens at this scale, ~0.7 s). The limit after."""
    pool = f"p{uuid.uuid4().hex[:8]}"
    sluice = Sluice(workdir, upstream=sim.url, policy=_brownout_policy(pool))
    try:
        client = bedrock_client(sluice.url)
        slow = {"maxTokens": 4096}
        deadline = time.monotonic() + 4

        def caller(i: int) -> list[int]:
            got = []
            while time.monotonic() < deadline:
                hang = hanging and i % 2 == 0
                text = "[[sim:output_tokens=4000]] go" if hang else "[[sim:output_tokens=5]] hi"
                try:
                    client.converse(
                        modelId=HAIKU,
                        messages=[{"role": "user", "content": [{"text": text}]}],
                        inferenceConfig=slow if hang else {"maxTokens": 16},
                    )
                    got.append(200)
                except ClientError as exc:
                    got.append(int(exc.response["ResponseMetadata"]["HTTPStatusCode"]))
                    time.sleep(0.02)
            return got

        with ThreadPoolExecutor(8) as callers:
            statuses = [s for got in callers.map(caller, range(8)) for s in got]
        assert 200 in statuses and 429 in statuses, statuses  # served, and refused: demand
        assert (408 in statuses) is hanging, statuses
        return metric_value(sluice.metrics(), "sluice_adaptive_limit", pool=pool)
    finally:
        sluice.stop()


@pytest.mark.long  # ~10 s: two runs of 8 callers; make test-all runs it
def test_calls_past_the_read_timeout_hold_the_limit(sim: Simulator, tmp_path: Path) -> None:
    # Same run, same load, with and without the calls Bedrock leaves hanging: on fast calls
    # alone the controller grows the limit (demand, p99 under target); with half of them
    # timing out, their 0.3 s is over the 250 ms target and the limit holds, instead of
    # growing into the brownout on the evidence of the fast half only.
    assert _limit_after_load(sim, tmp_path / "fast", hanging=False) >= 6
    assert _limit_after_load(sim, tmp_path / "hang", hanging=True) <= 3


async def test_calls_never_answered_neither_dilute_the_breaker_nor_pass_as_probes(
    adaptivity: Setup,
) -> None:
    pool, a, registry, _ = adaptivity
    for _ in range(30):  # hung past the read timeout: latency samples, not served calls
        a.observe(pool, "P0", 300.0, False, False, unanswered=True)
    await asyncio.sleep(0.3)
    assert _state(registry, pool) == CLOSED  # no outcome among them
    for _ in range(12):
        a.observe(pool, "P0", 900.0, False, True)
    await until(lambda: _state(registry, pool) == OPEN, 3.0)  # 12 of 12, not 12 of 42
    await until(lambda: _state(registry, pool) == HALF_OPEN)
    await until(lambda: a.breaker_allows(pool))
    a.observe(pool, "P0", 300.0, False, False, unanswered=True)  # the probe hung
    await until(lambda: _state(registry, pool) == OPEN)
