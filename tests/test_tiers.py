"""Service tiers by priority class: the policy's mapping (pure) and the tier on the wire (e2e)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from botocore.exceptions import ClientError

from proxy.app import POLICY_REF, Settings, build_app
from proxy.config import PolicyError, parse_policy
from proxy.pipeline.tiers import (
    TierChoice,
    TierTable,
    apply_tier,
    caller_tier,
    escalation,
)
from proxy.policy import CompiledPolicy
from tests.support.processes import Simulator, Sluice, bedrock_client, metric_value

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"


def _policy(**classes: dict[str, Any]) -> dict[str, Any]:
    return {
        "identity": {"header_mode": True, "default_workload": "chat"},
        "server": {"retry": {"max_retries": 0}},
        "models": {
            "haiku": {"ids": [HAIKU]},
            "sonnet": {
                "ids": [SONNET],
                "service_tiers": ["default", "priority"],
                "class_tiers": {"P1": "priority"},
            },
        },
        "priorities": {
            "P0": {"tier": "priority"},
            "P1": {"tier": "default", "tier_on_throttle": "priority"},
            "batch": {"tier": "flex", "tier_on_throttle": "default", "share": 0.4},
            **classes,
        },
        "workloads": {
            "chat": {"priority": "P0"},
            "reco": {"priority": "P1"},
            "nightly": {"priority": "batch"},
            "urgent-batch": {"priority": "batch", "tier": "default"},
            "slow-batch": {"priority": "batch", "deadline_seconds": 0.5},
        },
    }


TABLE = TierTable(parse_policy(_policy()))


@pytest.mark.parametrize(
    ("workload", "priority", "pool", "tier", "on_throttle"),
    [
        ("chat", "P0", "haiku", "priority", None),
        ("reco", "P1", "haiku", "default", "priority"),
        ("nightly", "batch", "haiku", "flex", "default"),
        ("urgent-batch", "batch", "haiku", "default", None),  # the workload's tier wins
        ("reco", "P1", "sonnet", "priority", None),  # the pool's class_tiers win
        ("nightly", "batch", "sonnet", "default", None),  # sonnet offers no flex: default
        ("chat", "P0", "_other", "priority", None),  # a model in no pool: every tier
    ],
)
def test_tier_per_class_workload_and_pool(
    workload: str, priority: str, pool: str, tier: str, on_throttle: str | None
) -> None:
    assert TABLE.choose(workload, priority, pool, None) == TierChoice(tier, on_throttle)


@pytest.mark.parametrize(
    ("mode", "policy_tier", "asked", "sent"),
    [
        ("lower_only", "default", "priority", "default"),  # nobody buys priority by header
        ("lower_only", "default", "flex", "flex"),
        ("lower_only", None, "priority", "default"),  # no class tier: default is the ceiling
        ("lower_only", None, None, None),  # nothing asked, nothing set: request untouched
        ("keep", "flex", "priority", "priority"),
        ("keep", "flex", None, "flex"),
        ("override", "flex", "priority", "flex"),
        ("override", None, "reserved", "reserved"),
        ("lower_only", "default", "gold", None),  # Bedrock rejects unknown tiers itself
    ],
)
def test_caller_tier_modes(
    mode: str, policy_tier: str | None, asked: str | None, sent: str | None
) -> None:
    table = TierTable(parse_policy(_policy(X={"tier": policy_tier, "caller_tier": mode})))
    assert table.choose("chat", "X", "haiku", asked).tier == sent


def test_apply_tier_sets_the_header_or_the_converse_field() -> None:
    body = json.dumps({"messages": [], "serviceTier": {"type": "priority"}}).encode()
    assert caller_tier("Converse", {}, body) == "priority"
    assert caller_tier("Converse", {}, b'{"messages": []}') is None
    new_body, headers = apply_tier("Converse", body, {}, TierChoice("default"))
    assert json.loads(new_body)["serviceTier"] == {"type": "default"} and headers == {}
    assert apply_tier("Converse", body, {}, None) == (body, {})
    same, headers = apply_tier("InvokeModel", b"{}", {"accept": "x"}, TierChoice("flex"))
    assert same == b"{}" and headers["x-amzn-bedrock-service-tier"] == "flex"
    assert caller_tier("InvokeModel", headers, b"{}") == "flex"


def test_escalation_only_after_a_throttle_and_only_once() -> None:
    choice = TierChoice("flex", "default")
    assert escalation(choice, 503, "ServiceUnavailableException") is None
    assert escalation(None, 429, "ThrottlingException") is None
    again = escalation(choice, 429, "ThrottlingException")
    assert again == TierChoice("default") and escalation(again, 429, "ThrottlingException") is None


def test_class_tiers_must_name_declared_classes() -> None:
    bad = _policy()
    bad["models"]["haiku"]["class_tiers"] = {"P9": "flex"}
    with pytest.raises(PolicyError, match=r"class_tiers\.P9: unknown priority class 'P9'"):
        parse_policy(bad, "p.yaml")


# -- on the wire: Sluice → simulator -------------------------------------------------------------


@pytest.fixture
def tiered(
    make_simulator: Callable[..., Simulator], make_sluice: Callable[..., Sluice]
) -> tuple[Simulator, Sluice]:
    # Flex on haiku is always throttled (its share can never be met); default never is.
    sim = make_simulator(
        {
            "latency_scale": 0,
            "models": {HAIKU: {"quotas": {"requests_per_minute": 1000}}},
            "service_tiers": {"flex": {"quota_share": 0.0001}},
        }
    )
    return sim, make_sluice(upstream=sim.url, policy=_policy())


def client_as(url: str, workload: str) -> Any:
    client = bedrock_client(url)

    def tag(request: Any, **_: Any) -> None:
        request.headers["x-sluice-workload"] = workload

    client.meta.events.register("before-sign.bedrock-runtime.*", tag)
    return client


ASK = [{"role": "user", "content": [{"text": "hi"}]}]


def test_tier_reaches_bedrock_and_is_reported_logged_and_counted(
    tiered: tuple[Simulator, Sluice],
) -> None:
    sim, proxy = tiered
    reply = client_as(proxy.url, "chat").converse(
        modelId=HAIKU, messages=ASK, serviceTier={"type": "default"}
    )
    assert reply["serviceTier"] == {"type": "default"}  # P0 maps to priority, but asked lower
    headers = reply["ResponseMetadata"]["HTTPHeaders"]
    assert headers["x-sluice-service-tier"] == "default"

    raw = client_as(proxy.url, "chat").invoke_model(
        modelId=HAIKU,
        body=json.dumps(
            {
                "anthropic_version": "bedrock-2023-05-31",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}],
            }
        ),
    )
    assert raw["serviceTier"] == "priority"
    sent = sim.stats()["requests"][-1]["headers"]
    assert sent["x-amzn-bedrock-service-tier"] == "priority"
    request_id = raw["ResponseMetadata"]["HTTPHeaders"]["x-sluice-request-id"]
    assert proxy.log_record(request_id)["service_tier"] == "priority"
    metrics = proxy.metrics()
    assert metric_value(metrics, "sluice_requests_total", tier="priority", workload="chat") == 1
    assert metric_value(metrics, "sluice_requests_total", tier="default", workload="chat") == 1


def test_a_flex_call_throttled_by_bedrock_is_retried_on_default_within_the_deadline(
    tiered: tuple[Simulator, Sluice],
) -> None:
    _, proxy = tiered
    reply = client_as(proxy.url, "nightly").converse(modelId=HAIKU, messages=ASK)
    headers = reply["ResponseMetadata"]["HTTPHeaders"]
    assert headers["x-sluice-service-tier"] == "default"
    assert headers["x-sluice-upstream-retries"] == "1"
    assert reply["serviceTier"] == {"type": "default"}
    fallbacks = metric_value(
        proxy.metrics(), "sluice_tier_fallbacks_total", from_tier="flex", to_tier="default"
    )
    assert fallbacks == 1

    # Less than a call's worth of deadline left: no second attempt, Bedrock's throttle is shown.
    with pytest.raises(ClientError) as info:
        client_as(proxy.url, "slow-batch").converse(modelId=HAIKU, messages=ASK)
    assert info.value.response["Error"]["Code"] == "ThrottlingException"
    assert info.value.response["ResponseMetadata"]["HTTPHeaders"]["x-sluice-service-tier"] == "flex"


async def test_a_policy_swap_changes_the_tier_of_the_next_call() -> None:
    # The tier table is read from the policy each call is decided under (PolicyRef).
    app = build_app(parse_policy(_policy()), Settings(upstream="simulator"))
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:

            async def tier() -> str:
                async with session.post(
                    server.make_url(f"/model/{HAIKU}/converse"),
                    data=json.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}),
                    headers={"x-sluice-workload": "nightly", "Content-Type": "application/json"},
                ) as response:
                    assert response.status == 200, await response.text()
                    return response.headers["x-sluice-service-tier"]

            assert await tier() == "flex"
            swapped = _policy()
            swapped["workloads"]["nightly"]["tier"] = "priority"
            app[POLICY_REF].swap(CompiledPolicy(parse_policy(swapped)))
            assert await tier() == "priority"
    finally:
        await server.close()
