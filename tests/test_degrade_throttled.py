"""A Bedrock throttle that survives Sluice's retries degrades a class with a chain (issue 9).

Sluice's own admission has room; Bedrock (the simulator) throttles every Sonnet call. A
workload with a chain must get Haiku's answer, never Bedrock's 429; a workload without one
gets the 429 with Retry-After.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support.processes import Simulator, Sluice, metric_value, workload_client

SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


@pytest.fixture
def stack(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> tuple[Sluice, Simulator, str]:
    # A simulator of its own: the session one is shared, and its faults outlive a test.
    sim = make_simulator({"models": {SONNET: {"faults": {"throttle_rate": 1.0}}}})
    tag = uuid.uuid4().hex[:8]
    policy = {
        "identity": {"header_mode": True},
        "server": {"retry": {"max_retries": 1, "base_backoff_ms": 10}},
        "models": {
            f"sonnet{tag}": {"ids": [SONNET], "concurrency": 20, "downgrade_to": f"haiku{tag}"},
            f"haiku{tag}": {"ids": [HAIKU], "concurrency": 20},
        },
        "workloads": {"chat": {"degrade": [f"haiku{tag}"]}, "strict": {}},
    }
    return make_sluice(upstream=sim.url, policy=policy, redis_url=redis_server.url), sim, tag


def test_exhausted_throttle_degrades_instead_of_a_429(
    stack: tuple[Sluice, Simulator, str],
) -> None:
    proxy, sim, tag = stack
    msgs = [{"role": "user", "content": [{"text": "hi"}]}]
    reply = workload_client(proxy.url, "chat").converse(modelId=SONNET, messages=msgs)
    h = reply["ResponseMetadata"]["HTTPHeaders"]
    assert h["x-sluice-degraded"] == "downgrade" and h["x-sluice-pool"] == f"haiku{tag}"
    models = sim.stats()["models"]
    assert models[SONNET]["throttled"] >= 1 and models[HAIKU]["requests"] == 1
    with pytest.raises(ClientError) as info:
        workload_client(proxy.url, "strict").converse(modelId=SONNET, messages=msgs)
    err = info.value.response
    assert err["Error"]["Code"] == "ThrottlingException"
    assert "retry-after" in err["ResponseMetadata"]["HTTPHeaders"]
    text = proxy.metrics()
    assert metric_value(text, "sluice_degraded_total", workload="chat", kind="downgrade") == 1
    # The throttled Sonnet call released its slot before Haiku took one.
    assert metric_value(text, "sluice_in_flight", pool=f"sonnet{tag}") == 0
