"""The Bedrock simulator over real sockets, driven by real boto3 clients (and raw HTTP)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from botocore.exceptions import ClientError, EventStreamError
from hypothesis import given
from hypothesis import strategies as st

from proxy.simulator import SimulatorConfig, SimulatorConfigError, load_simulator_config
from proxy.simulator.config import AuthConfig, ModelConfig
from proxy.simulator.models import ModelRuntime, TokenBucket
from proxy.simulator.text import count_tokens, reply_tokens
from tests.support.simulator_fixtures import (
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    RunningSimulator,
    anthropic_body,
    run_simulator,
)

SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
SONNET4 = "anthropic.claude-sonnet-4-20250514-v1:0"
BEARER = "sim-bearer-token"


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    """Zero latency, SigV4 required: every boto3 call also proves verification accepts it."""
    auth = AuthConfig(
        access_key_id=ACCESS_KEY_ID, secret_access_key=SECRET_ACCESS_KEY, bearer_token=BEARER
    )
    config = SimulatorConfig(latency_scale=0, auth=auth, guardrail_blocked_words=("海賊版",))
    async with run_simulator(config) as running:
        yield running


@pytest.fixture
async def open_sim() -> AsyncIterator[RunningSimulator]:
    """No authentication, small latency: for raw HTTP requests and timing."""
    async with run_simulator(SimulatorConfig(latency_scale=0.02)) as running:
        yield running


async def call(fn: Any, /, **kwargs: Any) -> Any:
    """Run a blocking boto3 call off the event loop."""
    return await asyncio.to_thread(fn, **kwargs)


async def post(
    sim: RunningSimulator, path: str, body: bytes | str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    async with sim.http.post(sim.url + path, data=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), json.loads(await resp.read())


# -- the happy paths, parsed by boto3 ----------------------------------------------------------


async def test_invoke_model_answers_anthropic_message_with_usage_headers(
    sim: RunningSimulator,
) -> None:
    client = sim.client()
    resp = await call(
        client.invoke_model,
        modelId=SONNET,
        body=anthropic_body("hello there"),
        performanceConfigLatency="optimized",
        serviceTier="priority",
    )
    doc = json.loads(resp["body"].read())
    headers = resp["ResponseMetadata"]["HTTPHeaders"]
    assert doc["id"].startswith("msg_bdrk_")
    assert doc["type"] == "message" and doc["role"] == "assistant"
    assert doc["content"][0]["type"] == "text" and doc["content"][0]["text"]
    assert doc["stop_reason"] == "end_turn"
    assert doc["usage"] == {"input_tokens": 3, "output_tokens": 40}
    assert resp["contentType"] == "application/json"
    assert headers["x-amzn-bedrock-input-token-count"] == "3"
    assert headers["x-amzn-bedrock-output-token-count"] == "40"
    assert int(headers["x-amzn-bedrock-invocation-latency"]) >= 0
    assert resp["performanceConfigLatency"] == "optimized"
    assert resp["serviceTier"] == "priority"


@pytest.mark.parametrize(
    "model_id",
    [
        SONNET,
        "us.anthropic.claude-sonnet-4-20250514-v1:0",
        "global.anthropic.claude-sonnet-4-20250514-v1:0",
        "apac.anthropic.claude-3-5-sonnet-20241022-v2:0",
        f"arn:aws:bedrock:us-east-1::foundation-model/{HAIKU}",
        "arn:aws:bedrock:eu-west-1:123456789012:inference-profile/eu.anthropic.claude-3-5-haiku-20241022-v1:0",
    ],
)
async def test_every_model_id_form_resolves(sim: RunningSimulator, model_id: str) -> None:
    resp = await call(sim.client().invoke_model, modelId=model_id, body=anthropic_body("hi"))
    assert json.loads(resp["body"].read())["usage"]["output_tokens"] == 40
    [record] = (await sim.stats())["requests"]
    # boto3 percent-encodes ':' and '/'; the record keeps the path exactly as received.
    assert "%3A" in record["path"] and record["status"] == 200


async def test_literal_colons_in_the_path_are_accepted(open_sim: RunningSimulator) -> None:
    # The Anthropic SDK leaves ':' unencoded.
    status, _, doc = await post(open_sim, f"/model/us.{SONNET}/invoke", anthropic_body("hi"))
    assert status == 200 and doc["model"] == "claude-3-sonnet-20240229"


@pytest.mark.parametrize(
    "model_id",
    [
        "anthropic.claude-unknown-v1:0",
        "xx.anthropic.claude-3-sonnet-20240229-v1:0",
        f"arn:aws:bedrock:us-east-1::foundation-model/us.{SONNET}",
        f"arn:aws:bedrock:us-east-1:123456789012:inference-profile/{SONNET}",
    ],
)
async def test_unknown_model_is_a_validation_exception(
    sim: RunningSimulator, model_id: str
) -> None:
    with pytest.raises(ClientError) as info:
        await call(sim.client().invoke_model, modelId=model_id, body=anthropic_body("hi"))
    assert info.value.response["Error"]["Code"] == "ValidationException"
    assert info.value.response["Error"]["Message"] == "The provided model identifier is invalid."
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def _anthropic_events(resp: dict[str, Any]) -> list[dict[str, Any]]:
    assert resp["contentType"] == "application/json"
    return [json.loads(event["chunk"]["bytes"]) for event in resp["body"]]


async def test_invoke_stream_sends_anthropic_events_with_usage_and_metrics(
    sim: RunningSimulator,
) -> None:
    resp = await call(
        sim.client().invoke_model_with_response_stream,
        modelId=SONNET4,
        body=anthropic_body("stream please [[sim:output_tokens=10]]"),
    )
    events = await asyncio.to_thread(_anthropic_events, resp)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"} and len(kinds[2:-3]) == 4  # 3 tokens each
    input_tokens = events[0]["message"]["usage"]["input_tokens"]
    assert events[-2]["usage"] == {"output_tokens": 10}
    assert events[-2]["delta"]["stop_reason"] == "end_turn"
    metrics = events[-1]["amazon-bedrock-invocationMetrics"]
    assert metrics["inputTokenCount"] == input_tokens and metrics["outputTokenCount"] == 10
    assert {"invocationLatency", "firstByteLatency"} <= metrics.keys()
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == "".join(reply_tokens("stream please [[sim:output_tokens=10]]", 10))


async def test_converse_answers_message_usage_metrics_and_echoes_tiers(
    sim: RunningSimulator,
) -> None:
    resp = await call(
        sim.client().converse,
        modelId=HAIKU,
        messages=[{"role": "user", "content": [{"text": "おすすめの漫画は? 📚"}]}],
        system=[{"text": "You are a shop assistant."}],
        inferenceConfig={"maxTokens": 25},
        performanceConfig={"latency": "standard"},
        serviceTier={"type": "flex"},
    )
    assert resp["output"]["message"]["role"] == "assistant"
    assert resp["stopReason"] == "max_tokens"  # default 40 tokens capped at 25
    usage = resp["usage"]
    assert usage["outputTokens"] == 25
    assert usage["totalTokens"] == usage["inputTokens"] + 25
    assert "latencyMs" in resp["metrics"]
    assert resp["performanceConfig"] == {"latency": "standard"}
    assert resp["serviceTier"] == {"type": "flex"}


async def test_converse_stream_events_end_with_usage_metadata(sim: RunningSimulator) -> None:
    resp = await call(
        sim.client().converse_stream,
        modelId=f"us.{SONNET4}",
        messages=[{"role": "user", "content": [{"text": "hi [[sim:output_tokens=7]]"}]}],
    )
    events = await asyncio.to_thread(list, resp["stream"])
    names = [next(iter(e)) for e in events]
    assert names[0] == "messageStart" and names[-3:] == [
        "contentBlockStop",
        "messageStop",
        "metadata",
    ]
    assert set(names[1:-3]) == {"contentBlockDelta"}
    assert events[-2]["messageStop"]["stopReason"] == "end_turn"
    assert events[-1]["metadata"]["usage"]["outputTokens"] == 7
    assert "latencyMs" in events[-1]["metadata"]["metrics"]


async def test_count_tokens_counts_both_input_forms_like_the_model_calls(
    sim: RunningSimulator,
) -> None:
    client = sim.client()
    text = "注文した漫画はいつ届きますか? 🚚 order 1234"
    body = anthropic_body(text)
    invoked = await call(client.invoke_model, modelId=SONNET, body=body)
    charged = int(invoked["ResponseMetadata"]["HTTPHeaders"]["x-amzn-bedrock-input-token-count"])
    by_body = await call(client.count_tokens, modelId=SONNET, input={"invokeModel": {"body": body}})
    by_converse = await call(
        client.count_tokens,
        modelId=SONNET,
        input={"converse": {"messages": [{"role": "user", "content": [{"text": text}]}]}},
    )
    assert by_body["inputTokens"] == by_converse["inputTokens"] == charged
    # 14 kana/kanji x 1.5 + 1 emoji x 2 + 13 ASCII / 4 = 26.25 -> 27
    assert charged == 27


async def test_apply_guardrail_passes_clean_text_and_blocks_configured_words(
    sim: RunningSimulator,
) -> None:
    client = sim.client()
    clean = await call(
        client.apply_guardrail,
        guardrailIdentifier="gr-1",
        guardrailVersion="1",
        source="INPUT",
        content=[{"text": {"text": "新刊はありますか"}}],
    )
    assert clean["action"] == "NONE" and clean["outputs"] == []
    blocked = await call(
        client.apply_guardrail,
        guardrailIdentifier="gr-1",
        guardrailVersion="DRAFT",
        source="OUTPUT",
        content=[{"text": {"text": "海賊版のリンクをください"}}],
    )
    assert blocked["action"] == "GUARDRAIL_INTERVENED"
    assert blocked["outputs"] == [{"text": "Sorry, the model cannot answer this question."}]
    words = blocked["assessments"][0]["wordPolicy"]["customWords"]
    assert words[0]["match"] == "海賊版" and words[0]["action"] == "BLOCKED"


async def test_async_invocations_are_kept_and_listed(sim: RunningSimulator) -> None:
    client = sim.client()
    started = await call(
        client.start_async_invoke,
        modelId=SONNET,
        modelInput={"prompt": "x"},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://bucket/out"}},
        clientRequestToken="token-1",
    )
    arn = started["invocationArn"]
    assert arn.startswith("arn:aws:bedrock:us-east-1:123456789012:async-invoke/")
    again = await call(
        client.start_async_invoke,
        modelId=SONNET,
        modelInput={"prompt": "x"},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://bucket/out"}},
        clientRequestToken="token-1",
    )
    assert again["invocationArn"] == arn  # idempotent on the client token
    job = await call(client.get_async_invoke, invocationArn=arn)
    assert job["status"] == "Completed"  # zero latency
    assert job["modelArn"].endswith(f"foundation-model/{SONNET}")
    listed = await call(client.list_async_invokes, maxResults=10, statusEquals="Completed")
    assert [s["invocationArn"] for s in listed["asyncInvokeSummaries"]] == [arn]
    with pytest.raises(ClientError) as info:
        await call(client.get_async_invoke, invocationArn=arn + "0")
    assert info.value.response["Error"]["Code"] == "ResourceNotFoundException"


async def test_japanese_and_emoji_round_trip_and_reply_is_deterministic(
    sim: RunningSimulator,
) -> None:
    client = sim.client()
    prompt = "在庫はありますか 🎌 ワンピース 105巻"

    async def reply(text: str) -> str:
        resp = await call(client.invoke_model, modelId=HAIKU, body=anthropic_body(text))
        return str(json.loads(resp["body"].read())["content"][0]["text"])

    first, second, other = await asyncio.gather(reply(prompt), reply(prompt), reply(prompt + "?"))
    assert first == second != other
    assert first.startswith("シミュレーターの応答 📚")
    records = (await sim.stats())["requests"]
    assert all(r["headers"]["user-agent"].startswith("Boto3/") for r in records)


# -- quotas and throttling ---------------------------------------------------------------------


async def test_throttle_is_a_throttling_exception_with_bedrock_headers(
    sim: RunningSimulator,
) -> None:
    with pytest.raises(ClientError) as info:
        await call(
            sim.client().invoke_model, modelId=SONNET, body=anthropic_body("[[sim:fail=throttle]]")
        )
    response = info.value.response
    assert response["Error"]["Code"] == "ThrottlingException"
    assert response["Error"]["Message"] == "Too many requests, please wait before trying again."
    headers = response["ResponseMetadata"]["HTTPHeaders"]
    assert headers["x-amzn-errortype"].startswith("ThrottlingException:")
    assert response["ResponseMetadata"]["RetryAttempts"] == 0
    assert (await sim.model_stats(SONNET))["throttled"] == 1


async def test_standard_retry_mode_tries_a_throttled_call_three_times(
    sim: RunningSimulator,
) -> None:
    client = sim.client(attempts=3)  # standard mode's default
    with pytest.raises(ClientError) as info:
        await call(client.invoke_model, modelId=HAIKU, body=anthropic_body("[[sim:fail=throttle]]"))
    assert info.value.response["ResponseMetadata"]["RetryAttempts"] == 2
    statuses = [r["status"] for r in (await sim.stats())["requests"]]
    assert statuses == [429, 429, 429]


async def test_concurrency_quota_holds_under_many_concurrent_clients(
    open_sim: RunningSimulator,
) -> None:
    patch = {"latency_scale": 0.2, "models": {HAIKU: {"quotas": {"concurrency": 3}}}}
    await open_sim.configure(patch)
    client = open_sim.client(pool=16)
    body = anthropic_body("[[sim:output_tokens=30]]")  # ~90 ms TTFT + 50 ms output each
    loop = asyncio.get_running_loop()

    def one() -> str:
        try:
            client.invoke_model(modelId=HAIKU, body=body)
        except ClientError as exc:
            return str(exc.response["Error"]["Code"])
        return "ok"

    # One thread per client call: the default executor has too few workers on 2 cores.
    with ThreadPoolExecutor(16) as pool:
        outcomes = await asyncio.gather(*(loop.run_in_executor(pool, one) for _ in range(16)))
    stats = await open_sim.model_stats(HAIKU)
    assert set(outcomes) == {"ok", "ThrottlingException"}
    assert stats["peak_concurrency"] == 3
    assert stats["admitted"] == outcomes.count("ok")
    assert stats["throttled"] == outcomes.count("ThrottlingException")
    assert stats["in_flight"] == 0


async def test_concurrency_quota_can_be_raised_at_runtime(open_sim: RunningSimulator) -> None:
    await open_sim.configure({"models": {HAIKU: {"quotas": {"concurrency": 0}}}})
    client = open_sim.client()
    with pytest.raises(ClientError):
        await call(client.invoke_model, modelId=HAIKU, body=anthropic_body("hi"))
    # Any id form names the model in a patch.
    config = await open_sim.configure({"models": {f"us.{HAIKU}": {"quotas": {"concurrency": 5}}}})
    assert config["models"][HAIKU]["quotas"]["concurrency"] == 5
    await call(client.invoke_model, modelId=HAIKU, body=anthropic_body("hi"))


async def test_tokens_per_minute_reserves_max_tokens_times_burndown_and_settles_actual(
    sim: RunningSimulator,
) -> None:
    await sim.configure({"models": {SONNET4: {"quotas": {"tokens_per_minute": 1000}}}})
    client = sim.client()
    body = anthropic_body("hello there", max_tokens=150)  # reserve 3 + 150 x 5 = 753

    await call(client.invoke_model, modelId=SONNET4, body=body)  # settles 3 + 40 x 5 = 203
    await call(client.invoke_model, modelId=SONNET4, body=body)  # fits: ~797 left
    with pytest.raises(ClientError) as info:
        await call(client.invoke_model, modelId=SONNET4, body=body)  # ~44 left
    assert info.value.response["Error"]["Code"] == "ThrottlingException"
    assert info.value.response["Error"]["Message"] == (
        "Too many tokens, please wait before trying again."
    )
    stats = await sim.model_stats(SONNET4)
    assert (stats["admitted"], stats["throttled"], stats["output_tokens"]) == (2, 1, 80)


async def test_requests_per_minute_quota_refuses_the_excess(sim: RunningSimulator) -> None:
    await sim.configure({"models": {SONNET: {"quotas": {"requests_per_minute": 2}}}})
    client = sim.client()
    for _ in range(2):
        await call(client.invoke_model, modelId=SONNET, body=anthropic_body("hi"))
    with pytest.raises(ClientError) as info:
        await call(client.invoke_model, modelId=SONNET, body=anthropic_body("hi"))
    assert info.value.response["Error"]["Message"].startswith("Too many requests")
    await sim.reset()  # refills the buckets
    await call(client.invoke_model, modelId=SONNET, body=anthropic_body("hi"))


@given(
    capacity=st.integers(min_value=1, max_value=10_000),
    ops=st.lists(
        st.tuples(st.floats(min_value=0, max_value=30), st.integers(min_value=0, max_value=5000)),
        max_size=30,
    ),
)
def test_token_bucket_never_overfills_nor_grants_more_than_it_holds(
    capacity: int, ops: list[tuple[float, int]]
) -> None:
    now = 0.0
    bucket = TokenBucket(capacity, now)
    for elapsed, amount in ops:
        now += elapsed
        level_before = min(capacity, bucket.level + elapsed * capacity / 60)
        if bucket.available(amount, now):
            bucket.take(amount, now)
            assert bucket.level >= 0
        else:
            assert level_before < amount
        assert bucket.level <= capacity


def test_time_to_first_token_grows_with_input_size() -> None:
    runtime = ModelRuntime(SONNET, SimulatorConfig().models[SONNET], 1.0)
    runtime.configure(SimulatorConfig().models[SONNET], 1.0, 0.0)
    short, long = runtime.first_token_delay(200), runtime.first_token_delay(8000)
    assert short < 1.1 and long > 8  # an 8K-token prompt waits ~10 s for its first token
    assert runtime.output_delay(60) == pytest.approx(1.0)


async def test_non_streaming_reply_waits_the_modelled_latency(open_sim: RunningSimulator) -> None:
    big = "word " * 6400  # 8,000 tokens
    started = time.monotonic()
    await post(open_sim, f"/model/{SONNET}/invoke", anthropic_body("hi [[sim:output_tokens=6]]"))
    short = time.monotonic() - started
    started = time.monotonic()
    await post(open_sim, f"/model/{SONNET}/invoke", anthropic_body(big + "[[sim:output_tokens=6]]"))
    long = time.monotonic() - started
    # scale 0.02: ~0.76+0.1 s -> ~17 ms, and ~10.4+0.1 s -> ~210 ms (loose: shared CI cores)
    assert short < 0.15 and 0.2 < long < 1.0 and long - short > 0.15


# -- faults --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fail", "code", "status"),
    [
        ("unavailable", "ServiceUnavailableException", 503),
        ("timeout", "ModelTimeoutException", 408),
        ("internal", "InternalServerException", 500),
    ],
)
async def test_failure_directives_answer_bedrock_errors(
    sim: RunningSimulator, fail: str, code: str, status: int
) -> None:
    with pytest.raises(ClientError) as info:
        await call(
            sim.client().converse,
            modelId=SONNET,
            messages=[{"role": "user", "content": [{"text": f"[[sim:fail={fail}]]"}]}],
        )
    assert info.value.response["Error"]["Code"] == code
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert (await sim.model_stats(SONNET))["in_flight"] == 0


async def test_rate_based_faults_use_the_configured_rates(sim: RunningSimulator) -> None:
    await sim.configure({"models": {HAIKU: {"faults": {"unavailable_rate": 1.0}}}})
    with pytest.raises(ClientError) as info:
        await call(sim.client().invoke_model, modelId=HAIKU, body=anthropic_body("hi"))
    assert info.value.response["Error"]["Code"] == "ServiceUnavailableException"
    await sim.configure({"models": {HAIKU: {"faults": {"unavailable_rate": 0.0}}}})
    await call(sim.client().invoke_model, modelId=HAIKU, body=anthropic_body("hi"))


async def test_mid_stream_exception_surfaces_in_boto3_as_event_stream_error(
    sim: RunningSimulator,
) -> None:
    resp = await call(
        sim.client().invoke_model_with_response_stream,
        modelId=SONNET,
        body=anthropic_body("[[sim:fail=stream_error]] [[sim:stream_error_after=3]]"),
    )
    seen: list[dict[str, Any]] = []

    def consume() -> None:
        for event in resp["body"]:
            seen.append(event)

    with pytest.raises(EventStreamError) as info:
        await asyncio.to_thread(consume)
    assert info.value.response["Error"]["Code"] == "modelStreamErrorException"
    assert len(seen) == 3
    assert (await sim.model_stats(SONNET))["errors"] == 1


async def test_configured_stream_error_can_be_a_throttle_frame(sim: RunningSimulator) -> None:
    faults = {"stream_error_after": 1, "stream_error_type": "throttlingException"}
    await sim.configure({"models": {SONNET: {"faults": faults}}})
    resp = await call(
        sim.client().converse_stream,
        modelId=SONNET,
        messages=[{"role": "user", "content": [{"text": "hi"}]}],
    )
    with pytest.raises(EventStreamError) as info:
        await asyncio.to_thread(list, resp["stream"])
    assert info.value.response["Error"]["Code"] == "throttlingException"


# -- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_id", "secret", "code"),
    [
        (ACCESS_KEY_ID, "wrong-secret", "InvalidSignatureException"),
        ("AKIDUNKNOWN", SECRET_ACCESS_KEY, "UnrecognizedClientException"),
    ],
)
async def test_bad_credentials_are_refused_with_403(
    sim: RunningSimulator, key_id: str, secret: str, code: str
) -> None:
    client = sim.client(access_key_id=key_id, secret_access_key=secret)
    with pytest.raises(ClientError) as info:
        await call(client.invoke_model, modelId=SONNET, body=anthropic_body("hi"))
    assert info.value.response["Error"]["Code"] == code
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def _signed_headers(sim: RunningSimulator, path: str, body: bytes) -> dict[str, str]:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest("POST", sim.url + path, data=body, headers={"Content-Type": "x"})
    SigV4Auth(Credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY), "bedrock", "us-east-1").add_auth(
        request
    )
    return dict(request.headers.items())


async def test_a_body_changed_after_signing_fails_verification(sim: RunningSimulator) -> None:
    path = f"/model/{SONNET}/invoke"
    headers = _signed_headers(sim, path, anthropic_body("original"))
    ok = await post(sim, path, anthropic_body("original"), headers)
    assert ok[0] == 200
    status, resp_headers, doc = await post(sim, path, anthropic_body("tampered"), headers)
    assert status == 403
    assert resp_headers["x-amzn-ErrorType"].startswith("InvalidSignatureException")
    assert doc["message"].startswith("The request signature we calculated does not match")
    claimed = {**headers, "X-Amz-Content-SHA256": "0" * 64}
    assert (await post(sim, path, anthropic_body("original"), claimed))[0] == 403


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "MissingAuthenticationTokenException"),
        ("Bearer wrong", "UnrecognizedClientException"),
        ("AWS4-HMAC-SHA256 garbage", "IncompleteSignatureException"),
    ],
)
async def test_missing_or_malformed_authorization_is_refused(
    sim: RunningSimulator, authorization: str | None, code: str
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    status, resp_headers, doc = await post(sim, f"/model/{SONNET}/invoke", b"{}", headers)
    assert status == 403
    assert resp_headers["x-amzn-ErrorType"].split(":")[0] == code
    assert doc["message"]


async def test_bearer_token_is_accepted(sim: RunningSimulator) -> None:
    headers = {"Authorization": f"Bearer {BEARER}"}
    status, _, doc = await post(sim, f"/model/{SONNET}/invoke", anthropic_body("hi"), headers)
    assert status == 200 and doc["usage"]["output_tokens"] == 40


# -- validation ----------------------------------------------------------------------------------

_V = "bedrock-2023-05-31"
_MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "Malformed input request: invalid JSON"),
        (b'{"text": "\xff\xfe"}', "Malformed input request: request body is not valid UTF-8"),
        (b"[]", "#: expected type: JSONObject, found: JSONArray"),
        ({"max_tokens": 5, "messages": _MSG}, "#: required key [anthropic_version] not found"),
        ({"anthropic_version": _V, "messages": _MSG}, "#: required key [max_tokens] not found"),
        ({"anthropic_version": _V, "max_tokens": 5}, "#: required key [messages] not found"),
        (
            {"anthropic_version": "bedrock-2099", "max_tokens": 5, "messages": _MSG},
            "not a valid enum",
        ),
        (
            {"anthropic_version": _V, "max_tokens": 5, "messages": _MSG, "x": 1},
            "extraneous key [x]",
        ),
        ({"anthropic_version": _V, "max_tokens": "5", "messages": _MSG}, "expected type: Integer"),
        ({"anthropic_version": _V, "max_tokens": 0, "messages": _MSG}, "greater or equal to 1"),
        ({"anthropic_version": _V, "max_tokens": 99999, "messages": _MSG}, "max_tokens: 99999 >"),
        ({"anthropic_version": _V, "max_tokens": 5, "messages": []}, "at least one message"),
        ({"anthropic_version": _V, "max_tokens": 5, "messages": {}}, "#/messages: expected type"),
        (
            {
                "anthropic_version": _V,
                "max_tokens": 5,
                "messages": [{"role": "bot", "content": ""}],
            },
            "#/messages/0/role: bot is not a valid enum value",
        ),
        (
            {"anthropic_version": _V, "max_tokens": 5, "messages": [{"role": "user"}]},
            "#/messages/0: required key [content] not found",
        ),
        (
            {
                "anthropic_version": _V,
                "max_tokens": 5,
                "messages": [{"role": "user", "content": 1}],
            },
            "#/messages/0/content: expected type: JSONArray",
        ),
        (
            {
                "anthropic_version": _V,
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "text"}]}],
            },
            "#/messages/0/content/0/text: expected type: String, found: null",
        ),
        (
            {"anthropic_version": _V, "max_tokens": 5, "messages": _MSG, "system": 5},
            "#/system: expected type: JSONArray",
        ),
        (
            {
                "anthropic_version": _V,
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "[[sim:bogus=1]]"}],
            },
            "unknown simulator directive",
        ),
    ],
)
async def test_invalid_invoke_bodies_are_validation_exceptions(
    open_sim: RunningSimulator, body: Any, message: str
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, headers, doc = await post(open_sim, f"/model/{SONNET}/invoke", raw)
    assert status == 400
    assert headers["x-amzn-ErrorType"].startswith("ValidationException:")
    assert message in doc["message"]
    assert (await open_sim.model_stats(SONNET))["errors"] == 1


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("converse", {}, "Value null at 'messages' failed to satisfy constraint"),
        ("converse", {"messages": "x"}, "Member must be a list"),
        ("converse-stream", {"messages": []}, "must start with a user message"),
        (
            "converse",
            {"messages": [{"role": "assistant", "content": [{"text": "x"}]}]},
            "must start with a user message",
        ),
        ("converse", {"messages": [{"role": "bot", "content": []}]}, "enum value set"),
        (
            "converse",
            {
                "messages": [{"role": "user", "content": [{"text": "x"}]}],
                "inferenceConfig": {"maxTokens": 9999},
            },
            "exceeds the model limit of 4096",
        ),
        (
            "converse",
            {
                "messages": [{"role": "user", "content": [{"text": "x"}]}],
                "inferenceConfig": {"maxTokens": 0},
            },
            "inferenceConfig.maxTokens",
        ),
        ("count-tokens", {"input": {}}, "exactly one of invokeModel, converse"),
        ("count-tokens", {"input": {"invokeModel": {"body": "!!"}}}, "not valid base64"),
        (
            "count-tokens",
            {"input": {"invokeModel": {"body": base64.b64encode(b"{}").decode()}}},
            "required key [anthropic_version]",
        ),
        ("count-tokens", {"input": {"converse": {}}}, "Value null at 'messages'"),
    ],
)
async def test_invalid_converse_and_count_tokens_bodies_are_validation_exceptions(
    open_sim: RunningSimulator, path: str, body: Any, message: str
) -> None:
    status, headers, doc = await post(open_sim, f"/model/{SONNET}/{path}", json.dumps(body))
    assert status == 400
    assert headers["x-amzn-ErrorType"].startswith("ValidationException:")
    assert message in doc["message"]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/guardrail/g/version/1/apply", {"source": "X", "content": []}, "[INPUT, OUTPUT]"),
        ("/guardrail/g/version/1/apply", {"source": "INPUT"}, "Value null at 'content'"),
        ("/async-invoke", {"modelId": SONNET}, "Value null at 'modelInput'"),
        (
            "/async-invoke",
            {"modelId": "nope", "modelInput": {}, "outputDataConfig": {}},
            "The provided model identifier is invalid.",
        ),
    ],
)
async def test_invalid_guardrail_and_async_bodies_are_validation_exceptions(
    open_sim: RunningSimulator, path: str, body: Any, message: str
) -> None:
    status, _, doc = await post(open_sim, path, json.dumps(body))
    assert status == 400 and message in doc["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/model/x/explode"), ("GET", f"/model/{SONNET}/invoke"), ("DELETE", "/")],
)
async def test_unknown_routes_answer_bedrock_style_json_404(
    open_sim: RunningSimulator, method: str, path: str
) -> None:
    async with open_sim.http.request(method, open_sim.url + path) as resp:
        assert resp.status == 404
        assert resp.headers["x-amzn-ErrorType"].startswith("UnknownOperationException:")
        assert resp.content_type == "application/json"
        assert (await resp.json())["message"]


# -- admin endpoints and cancellation ------------------------------------------------------------


async def test_stats_record_headers_and_reset_clears_them(sim: RunningSimulator) -> None:
    client = sim.client()
    await call(client.invoke_model, modelId=HAIKU, body=anthropic_body("hi"), trace="ENABLED")
    stats = await sim.stats()
    assert set(stats["models"][HAIKU]) == {
        "requests", "admitted", "throttled", "errors", "in_flight", "peak_concurrency",
        "cancelled", "input_tokens", "output_tokens",
    }  # fmt: skip
    assert stats["models"][HAIKU]["requests"] == 1
    assert stats["models"][HAIKU]["output_tokens"] == 40
    [record] = stats["requests"]
    assert record["method"] == "POST" and record["model"] == HAIKU and record["status"] == 200
    assert record["headers"]["x-amzn-bedrock-trace"] == "ENABLED"
    assert record["headers"]["authorization"].startswith("AWS4-HMAC-SHA256 Credential=")
    await sim.reset()
    stats = await sim.stats()
    assert stats["requests"] == [] and stats["models"][HAIKU]["requests"] == 0
    async with sim.http.get(sim.url + "/_sim/healthz") as resp:
        assert await resp.json() == {"status": "ok"}


async def test_config_patch_errors_name_the_field(sim: RunningSimulator) -> None:
    patch = {"models": {SONNET: {"quotas": {"concurrency": -1}}}}
    status, _, doc = await post(sim, "/_sim/config", json.dumps(patch))
    assert status == 400
    assert f"models.{SONNET}.quotas.concurrency" in doc["message"]
    status, _, doc = await post(sim, "/_sim/config", json.dumps({"latency_scal": 1}))
    assert status == 400 and "latency_scal" in doc["message"]
    async with sim.http.get(sim.url + "/_sim/config") as resp:
        assert (await resp.json())["latency_scale"] == 0


async def _wait_for(sim: RunningSimulator, model: str, key: str, value: int) -> dict[str, Any]:
    for _ in range(200):
        stats = await sim.model_stats(model)
        if stats[key] == value:
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} never reached {value}: {stats}")


async def test_client_leaving_mid_stream_is_counted_as_cancelled(
    open_sim: RunningSimulator,
) -> None:
    body = anthropic_body("[[sim:output_tokens=600]]")  # ~0.2 s of paced deltas at scale 0.02
    url = f"{open_sim.url}/model/{HAIKU}/invoke-with-response-stream"
    async with aiohttp.ClientSession() as session, session.post(url, data=body) as resp:
        assert resp.status == 200
        await resp.content.readany()
        resp.close()  # drop the connection mid-stream
    stats = await _wait_for(open_sim, HAIKU, "cancelled", 1)
    assert stats["in_flight"] == 0 and 0 < stats["output_tokens"] < 600


async def test_client_leaving_before_the_reply_is_counted_as_cancelled(
    open_sim: RunningSimulator,
) -> None:
    await open_sim.configure({"latency_scale": 1.0})  # the reply would take ~1 s
    url = f"{open_sim.url}/model/{SONNET}/invoke"
    timeout = aiohttp.ClientTimeout(total=0.1)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(url, data=anthropic_body("hi")):
                pass
    stats = await _wait_for(open_sim, SONNET, "cancelled", 1)
    assert stats["in_flight"] == 0 and stats["admitted"] == 1
    assert (await open_sim.stats())["requests"][-1]["status"] == 499


# -- configuration files -------------------------------------------------------------------------


def test_yaml_config_merges_onto_the_default_models(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(
        "latency_scale: 0.5\n"
        "models:\n"
        f"  {SONNET}:\n"
        "    quotas: {concurrency: 40, tokens_per_minute: 200000}\n"
        "  custom.model-v1:0:\n"
        "    max_output_tokens: 100\n",
        encoding="utf-8",
    )
    config = load_simulator_config(str(path))
    assert config.latency_scale == 0.5
    assert config.models[SONNET].quotas.concurrency == 40
    assert config.models[SONNET].latency.ttft_s == 0.76  # default kept
    assert config.models[SONNET4].output_token_weight == 5
    assert config.models["custom.model-v1:0"] == ModelConfig(max_output_tokens=100)
    assert load_simulator_config(None) == SimulatorConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"models:\n  {SONNET}:\n    quotas: {{concurrency: lots}}\n", "quotas.concurrency"),
        ("latency_scale: -1\n", "latency_scale"),
        ("unknown_setting: 1\n", "unknown_setting"),
        ("auth: {access_key_id: AKID}\n", "auth"),
        ("- a list\n", "(top level)"),
        ("key: [unclosed\n", "cannot read"),
    ],
)
def test_bad_config_files_name_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SimulatorConfigError) as info:
        load_simulator_config(str(path))
    assert str(path) in str(info.value) and message in str(info.value)


def test_token_estimate_rules() -> None:
    assert count_tokens("abcd" * 10) == 10
    assert count_tokens("漫画") == 3
    assert count_tokens("📚") == 2
    assert count_tokens("é") == 1
