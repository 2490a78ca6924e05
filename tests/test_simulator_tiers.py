"""The simulator's service tiers and its SigV4 clock-skew window, through real boto3 clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from proxy.errors import BedrockError
from proxy.simulator import SimulatorConfig
from proxy.simulator.auth import check_skew
from tests.support.simulator_fixtures import (
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    RunningSimulator,
    anthropic_body,
    run_simulator,
)

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
ASK = [{"role": "user", "content": [{"text": "hi [[sim:output_tokens=3]]"}]}]


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    config = SimulatorConfig.model_validate(
        {
            "latency_scale": 0,
            "auth": {"access_key_id": ACCESS_KEY_ID, "secret_access_key": SECRET_ACCESS_KEY},
            "models": {
                HAIKU: {"quotas": {"requests_per_minute": 10}},
                SONNET: {"service_tiers": ["default", "priority"]},
            },
            "service_tiers": {"default": {"quota_share": 0.9}},
        }
    )
    async with run_simulator(config) as running:
        yield running


async def _converse(sim: RunningSimulator, model: str, tier: str | None) -> dict[str, Any]:
    extra = {} if tier is None else {"serviceTier": {"type": tier}}
    client = sim.client()
    return dict(await asyncio.to_thread(client.converse, modelId=model, messages=ASK, **extra))


async def test_the_tier_is_echoed_by_converse_and_invoke_model(sim: RunningSimulator) -> None:
    reply = await _converse(sim, SONNET, "priority")
    assert reply["serviceTier"] == {"type": "priority"}
    raw = await asyncio.to_thread(
        sim.client().invoke_model, modelId=HAIKU, body=anthropic_body("hi"), serviceTier="flex"
    )
    assert raw["serviceTier"] == "flex"
    assert "serviceTier" not in await _converse(sim, SONNET, None)


@pytest.mark.parametrize("model", [HAIKU, SONNET])
async def test_an_unknown_or_unoffered_tier_is_a_validation_exception(
    sim: RunningSimulator, model: str
) -> None:
    with pytest.raises(ClientError) as info:
        await _converse(sim, model, "gold")
    assert info.value.response["Error"]["Code"] == "ValidationException"
    assert "enum value set: [priority, default, flex, reserved]" in str(info.value)
    if model == SONNET:  # offers default and priority only
        with pytest.raises(ClientError, match="does not support the 'flex' service tier"):
            await _converse(sim, model, "flex")


async def test_flex_is_throttled_first_then_default_and_priority_gets_the_rest(
    sim: RunningSimulator,
) -> None:
    # 10 requests/min: flex may take the bucket down to 50%, default to 10%, priority to 0.
    outcomes: dict[str, list[bool]] = {}
    for tier in ("flex", "default", "priority"):
        outcomes[tier] = []
        for _ in range(6):
            try:
                await _converse(sim, HAIKU, tier)
                outcomes[tier].append(True)
            except ClientError as exc:
                assert exc.response["Error"]["Code"] == "ThrottlingException"
                outcomes[tier].append(False)
    assert [sum(v) for v in outcomes.values()] == [5, 4, 1]
    assert outcomes["flex"][-1] is False


async def test_each_tier_scales_the_models_latency() -> None:
    model = {"latency": {"ttft_s": 0.4, "ttft_per_1k_input_s": 0, "output_tokens_per_s": 1e6}}
    config = SimulatorConfig.model_validate(
        {
            "latency_scale": 1,
            "models": {HAIKU: model},
            "service_tiers": {"flex": {"quota_share": 1}},
        }
    )
    async with run_simulator(config) as running:
        latency = {}
        for tier in ("priority", "flex"):
            body = json.dumps({"messages": ASK, "serviceTier": {"type": tier}})
            async with running.http.post(f"{running.url}/model/{HAIKU}/converse", data=body) as r:
                latency[tier] = (await r.json())["metrics"]["latencyMs"]
    assert config.service_tiers["flex"].latency_factor == 1.5  # a partial entry keeps defaults
    # Sleeps never end early: lower bounds hold on a busy machine; priority (0.3 s) < flex (0.6 s).
    assert latency["priority"] >= 300 and latency["flex"] >= 600
    assert latency["priority"] < latency["flex"]


def test_signatures_older_or_newer_than_15_minutes_are_refused() -> None:
    now = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
    check_skew("20261206T084600Z", now)  # 14 minutes: fine
    with pytest.raises(BedrockError, match=r"Signature expired: 20261206T084400Z is now earlier"):
        check_skew("20261206T084400Z", now)
    with pytest.raises(BedrockError, match="Signature not yet current"):
        check_skew("20261206T091600Z", now)


async def test_a_request_signed_16_minutes_ago_gets_invalid_signature(
    sim: RunningSimulator,
) -> None:
    path = f"/model/{HAIKU}/invoke"
    body = anthropic_body("hi")
    request = AWSRequest("POST", sim.url + path, data=body, headers={"Content-Type": "x"})
    signer = SigV4Auth(Credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY), "bedrock", "us-east-1")
    stamp = (datetime.now(UTC) - timedelta(minutes=16)).strftime("%Y%m%dT%H%M%SZ")
    request.context["timestamp"] = stamp
    request.headers["X-Amz-Date"] = stamp
    request.headers["host"] = sim.url.removeprefix("http://")
    canonical = signer.canonical_request(request)
    signature = signer.signature(signer.string_to_sign(request, canonical), request)
    scope = f"{ACCESS_KEY_ID}/{stamp[:8]}/us-east-1/bedrock/aws4_request"
    headers = {
        "Content-Type": "x",
        "X-Amz-Date": stamp,
        "Authorization": f"AWS4-HMAC-SHA256 Credential={scope}, "
        f"SignedHeaders={signer.signed_headers(signer.headers_to_sign(request))}, "
        f"Signature={signature}",
    }
    async with sim.http.post(sim.url + path, data=body, headers=headers) as resp:
        assert resp.status == 403
        assert resp.headers["x-amzn-ErrorType"].startswith("InvalidSignatureException")
        assert "Signature expired" in (await resp.json())["message"]
