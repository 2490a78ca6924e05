"""Waiting instead of refusing, end to end: two Sluice processes, one Redis, real boto3."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support.processes import Simulator, Sluice, bedrock_client, metric_value

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


def body(tokens: int) -> bytes:
    return json.dumps(
        {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 2000,
            "messages": [{"role": "user", "content": f"[[sim:output_tokens={tokens}]] go"}],
        }
    ).encode()


def client_as(url: str, workload: str) -> Any:
    client = bedrock_client(url, read_timeout=30)
    client.meta.events.register(
        "before-sign.bedrock-runtime.*",
        lambda request, **_: request.headers.__setitem__("x-sluice-workload", workload),
    )
    return client


@pytest.fixture
def pair(redis_server: Any, make_simulator: Any, make_sluice: Any) -> tuple[Sluice, Sluice]:
    sim: Simulator = make_simulator({"latency_scale": 1.0})
    pool = f"haiku{uuid.uuid4().hex[:6]}"
    policy = {
        "identity": {"header_mode": True},
        "models": {pool: {"ids": [HAIKU], "concurrency": 1}},
        "priorities": {"P0": {"share": 1.0}, "P2": {"share": 1.0}},
        "workloads": {
            "orders": {"priority": "P0", "max_wait_ms": 15000},
            "browse": {"priority": "P2", "max_wait_ms": 15000},
            "impatient": {"priority": "P2", "max_wait_ms": 50},
        },
    }
    a = make_sluice(upstream=sim.url, policy=policy, redis_url=redis_server.url)
    b = make_sluice(upstream=sim.url, policy=policy, redis_url=redis_server.url)
    return a, b


def test_waiters_are_served_by_priority_across_instances(pair: tuple[Sluice, Sluice]) -> None:
    a, b = pair
    order: list[str] = []
    lock = threading.Lock()

    def call(url: str, workload: str, name: str, tokens: int) -> None:
        client_as(url, workload).invoke_model(modelId=HAIKU, body=body(tokens))
        with lock:
            order.append(name)

    with ThreadPoolExecutor(4) as pool:
        holder = pool.submit(call, a.url, "orders", "holder", 120)  # ~1.5 s on the one slot
        time.sleep(0.4)
        first_p2 = pool.submit(call, a.url, "browse", "p2", 10)  # waits first, lowest class
        time.sleep(0.3)
        p0_b = pool.submit(call, b.url, "orders", "p0-b", 10)  # other instance, higher class
        time.sleep(0.3)
        p0_a = pool.submit(call, a.url, "orders", "p0-a", 10)
        for f in (holder, first_p2, p0_b, p0_a):
            f.result()
    assert order == ["holder", "p0-b", "p0-a", "p2"]
    text = a.metrics() + b.metrics()
    assert metric_value(text, "sluice_wait_seconds_count", outcome="admitted") >= 3


def test_a_deadline_that_cannot_be_met_is_refused_at_once(pair: tuple[Sluice, Sluice]) -> None:
    a, _ = pair
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(client_as(a.url, "orders").invoke_model, modelId=HAIKU, body=body(120))
        time.sleep(0.4)
        started = time.monotonic()
        with pytest.raises(ClientError) as err:
            client_as(a.url, "impatient").invoke_model(modelId=HAIKU, body=body(5))
        assert time.monotonic() - started < 1.0
        holder.result()
    resp = err.value.response
    assert resp["Error"]["Code"] == "ThrottlingException"
    assert int(resp["ResponseMetadata"]["HTTPHeaders"]["retry-after-ms"]) > 0
