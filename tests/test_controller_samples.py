"""What the controller and the breaker learn from: calls Bedrock refused before any model work
(400, 403, 404: bad input, no access) are no sample of a pool's health or load.

A caller's stream of malformed calls comes back in milliseconds; counted, it diluted the
breaker's failure share (real calls failing went unnoticed) and pulled the controller's p99
and mean call length down. Real Sluice and simulator processes, a real boto3 client.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from proxy.control.breaker import CLOSED, HALF_OPEN, OPEN, BreakerBoard, BreakerRecord
from proxy.pipeline.settle import refused_before_model
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


def test_a_probe_refused_before_model_work_frees_its_slot() -> None:
    # Half-open: one probe slot here. A probe Bedrock refused with a 400 reports no outcome;
    # its slot goes to the next call, instead of the episode stalling for its outcome.
    board = BreakerBoard()
    board.update("p", BreakerRecord(HALF_OPEN, gen=1), granted=True)
    assert board.allow("p") and not board.allow("p")
    board.no_outcome("p")
    assert board.allow("p") and not board.allow("p")
    board.outcome("p", failed=False)
    assert board.probe_request("p")[2:] == (1, 0)  # one probe ok, none failed
    board.no_outcome("p")  # no probe outstanding: nothing to give back
    assert not board.allow("p")
