"""Real clients through Sluice and straight to the simulator, in the same run: what the
client gets back must not depend on whether Sluice is in between."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support.processes import (
    UPSTREAM_KEY_ID,
    UPSTREAM_SECRET,
    Simulator,
    Sluice,
    bedrock_client,
)

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sluice]:
    p = Sluice(tmp_path_factory.mktemp("clients"), upstream=simulator.url)
    yield p
    p.stop()


def _both(sim: Simulator, proxy: Sluice) -> dict[str, Any]:
    """boto3 clients: straight to the simulator (its own key) and through Sluice."""
    return {
        "direct": bedrock_client(sim.url, key_id=UPSTREAM_KEY_ID, secret=UPSTREAM_SECRET),
        "sluice": bedrock_client(proxy.url),
    }


def test_invoke_guardrail_checks_passes_through(sim: Simulator, proxy: Sluice) -> None:
    # botocore's bedrock-runtime model has InvokeGuardrailChecks (POST /guardrail-checks/invoke);
    # Sluice answered it with its own 404 UnknownOperationException.
    sim.configure({"guardrail_blocked_words": ["forbidden"]})
    answers = {}
    for via, client in _both(sim, proxy).items():
        result = client.invoke_guardrail_checks(
            messages=[{"role": "user", "content": [{"text": "a forbidden question"}]}],
            checks={
                "promptAttack": {"categories": [{"category": "JAILBREAK"}]},
                "sensitiveInformation": {"entities": [{"type": "EMAIL"}]},
            },
        )
        assert result["ResponseMetadata"]["HTTPStatusCode"] == 200, via
        answers[via] = {k: v for k, v in result.items() if k != "ResponseMetadata"}
    assert answers["sluice"] == answers["direct"]
    attack = answers["sluice"]["results"]["promptAttack"]["results"]
    assert attack == [{"category": "JAILBREAK", "severityScore": 1.0}]


def _cached_policy(degrade: list[str]) -> dict[str, Any]:
    return {
        "version": 1,
        "identity": {"default_workload": "w"},
        "models": {"haiku": {"ids": [HAIKU], "requests_per_minute": 60, "burst_requests": 1}},
        "priorities": {"p": {"share": 1.0}},
        "workloads": {"w": {"priority": "p", "cache": {"ttl_seconds": 600}, "degrade": degrade}},
    }


def _invoke_body() -> bytes:
    return json.dumps(
        {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 20,
            "messages": [{"role": "user", "content": "is this allowed?"}],
        }
    ).encode()


def test_cached_answer_is_not_served_to_a_call_naming_a_guardrail(
    sim: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    # InvokeModel names its guardrail in X-Amzn-Bedrock-GuardrailIdentifier/-Version, not
    # in the body: an answer made without the guardrail is not an answer to a call with it.
    proxy = make_sluice(upstream=sim.url, policy=_cached_policy(["cached"]))
    client = bedrock_client(proxy.url)
    body = _invoke_body()
    client.invoke_model(modelId=HAIKU, body=body)  # the pool's one burst slot; cached
    time.sleep(0.3)  # (the cache write runs in the background)

    with pytest.raises(ClientError) as err:
        client.invoke_model(
            modelId=HAIKU, body=body, guardrailIdentifier="gr-1", guardrailVersion="1"
        )
    assert err.value.response["Error"]["Code"] == "ThrottlingException"
    # The same call without a guardrail is the cached one (the premise of the test).
    again = client.invoke_model(modelId=HAIKU, body=body)
    assert again["ResponseMetadata"]["HTTPHeaders"]["x-sluice-degraded"] == "cache"
    assert sim.stats()["models"][HAIKU]["requests"] == 1


def test_calls_naming_different_guardrails_are_not_coalesced(
    make_simulator: Callable[..., Simulator], make_sluice: Callable[..., Sluice]
) -> None:
    # Identical bodies in flight together share one upstream call when the workload caches;
    # one naming a guardrail must not be handed the answer of one that names none.
    sim = make_simulator({"latency_scale": 1.0})
    policy = _cached_policy([])
    policy["models"]["haiku"].update(requests_per_minute=600, burst_requests=10)
    proxy = make_sluice(upstream=sim.url, policy=policy)
    body = _invoke_body()
    plain, guarded = bedrock_client(proxy.url), bedrock_client(proxy.url)
    with ThreadPoolExecutor(2) as pool:
        calls = [
            pool.submit(plain.invoke_model, modelId=HAIKU, body=body),
            pool.submit(
                guarded.invoke_model,
                modelId=HAIKU,
                body=body,
                guardrailIdentifier="gr-1",
                guardrailVersion="1",
            ),
        ]
        for call in calls:
            assert call.result()["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert sim.stats()["models"][HAIKU]["requests"] == 2
