"""Sluice as a faithful Bedrock pass-through: real boto3 → Sluice → simulator.

The simulator verifies every request's SigV4 signature with botocore's reference
signer against the upstream key Sluice was given, so each passing call here also
proves Sluice's re-signing.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from botocore.exceptions import ClientError, EventStreamError

from tests.support.processes import (
    UPSTREAM_KEY_ID,
    Simulator,
    Sluice,
    bedrock_client,
    free_port,
    metric_value,
)
from tests.support.sockets import dead_address

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
PROFILE = "us." + HAIKU
PROFILE_ARN = f"arn:aws:bedrock:us-east-1:123456789012:inference-profile/{PROFILE}"


def anthropic_body(text: str, max_tokens: int = 100) -> bytes:
    return json.dumps(
        {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}],
        }
    ).encode()


def converse_messages(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"text": text}]}]


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sluice]:
    p = Sluice(tmp_path_factory.mktemp("pt"), upstream=simulator.url)
    yield p
    p.stop()


@pytest.fixture
def client(proxy: Sluice, sim: Simulator) -> Any:
    return bedrock_client(proxy.url)


def test_invoke_model_round_trip_is_signed_by_sluice(client: Any, sim: Simulator) -> None:
    resp = client.invoke_model(modelId=HAIKU, body=anthropic_body("Hello"))
    doc = json.loads(resp["body"].read())
    assert doc["type"] == "message" and doc["content"][0]["text"]
    headers = resp["ResponseMetadata"]["HTTPHeaders"]
    assert int(headers["x-amzn-bedrock-output-token-count"]) == doc["usage"]["output_tokens"]
    assert headers["x-sluice-workload"] == "default"
    seen = sim.stats()["requests"][-1]
    assert f"Credential={UPSTREAM_KEY_ID}/" in seen["headers"]["authorization"]


def test_client_credentials_and_sluice_headers_never_go_upstream(
    proxy: Sluice, sim: Simulator
) -> None:
    client = bedrock_client(proxy.url, aws_session_token="CLIENT-SESSION-TOKEN")
    client.meta.events.register(
        "before-sign.bedrock-runtime.*",
        lambda request, **_: request.headers.__setitem__("x-sluice-priority", "default"),
    )
    client.invoke_model(modelId=HAIKU, body=anthropic_body("hi"))
    seen = sim.stats()["requests"][-1]["headers"]
    assert "AKIDCLIENTDEMO" not in seen["authorization"]
    assert "x-amz-security-token" not in seen
    assert not any(name.startswith("x-sluice") for name in seen)
    assert "CLIENT-SESSION-TOKEN" not in json.dumps(seen)
    assert "CLIENT-SESSION-TOKEN" not in (proxy.stdout_path.read_text() + proxy.stderr())


@pytest.mark.parametrize("model_id", [HAIKU, PROFILE, PROFILE_ARN])
def test_converse_accepts_every_model_id_form(client: Any, model_id: str) -> None:
    resp = client.converse(modelId=model_id, messages=converse_messages("Hi"))
    assert resp["output"]["message"]["content"][0]["text"]
    assert resp["usage"]["outputTokens"] > 0
    assert resp["stopReason"] == "end_turn"


def test_invoke_stream_events_parse_in_boto3(client: Any) -> None:
    resp = client.invoke_model_with_response_stream(
        modelId=HAIKU, body=anthropic_body("[[sim:output_tokens=30]] stream please")
    )
    types = []
    text = ""
    for event in resp["body"]:
        chunk = json.loads(event["chunk"]["bytes"])
        types.append(chunk["type"])
        if chunk["type"] == "content_block_delta":
            text += chunk["delta"]["text"]
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert text


def test_converse_stream_reports_usage_in_metadata(client: Any) -> None:
    resp = client.converse_stream(modelId=HAIKU, messages=converse_messages("tell me"))
    events = list(resp["stream"])
    assert "messageStart" in events[0]
    metadata = [e["metadata"] for e in events if "metadata" in e]
    assert metadata and metadata[0]["usage"]["outputTokens"] > 0


def test_count_tokens_and_apply_guardrail_pass_through(client: Any) -> None:
    counted = client.count_tokens(
        modelId=HAIKU,
        input={"invokeModel": {"body": anthropic_body("count these words please")}},
    )
    assert counted["inputTokens"] > 0
    result = client.apply_guardrail(
        guardrailIdentifier="gr-test",
        guardrailVersion="1",
        source="INPUT",
        content=[{"text": {"text": "hello"}}],
    )
    assert result["action"] in ("NONE", "GUARDRAIL_INTERVENED")


def test_japanese_and_emoji_pass_unchanged(client: Any, sim: Simulator) -> None:
    text = "在庫はありますか？📚🇯🇵 👨‍👩‍👧"
    resp = client.converse(modelId=HAIKU, messages=converse_messages(text))
    assert resp["output"]["message"]["content"][0]["text"]
    resp = client.invoke_model(modelId=HAIKU, body=anthropic_body(text))
    doc = json.loads(resp["body"].read())
    assert doc["content"][0]["text"]


def test_upstream_throttle_surfaces_as_throttling_exception(client: Any, sim: Simulator) -> None:
    with pytest.raises(ClientError) as err:
        client.converse(modelId=HAIKU, messages=converse_messages("[[sim:fail=throttle]]"))
    assert err.value.response["Error"]["Code"] == "ThrottlingException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    # Bedrock sends no Retry-After; Sluice adds one to the throttle it relays.
    headers = err.value.response["ResponseMetadata"]["HTTPHeaders"]
    assert headers["retry-after"] == "1" and headers["retry-after-ms"] == "1000"


def test_standard_retry_mode_retries_upstream_throttles(proxy: Sluice, sim: Simulator) -> None:
    client = bedrock_client(proxy.url, retries={"total_max_attempts": 3, "mode": "standard"})
    before = metric_value(proxy.metrics(), "sluice_upstream_retries_total")
    with pytest.raises(ClientError) as err:
        client.converse(modelId=HAIKU, messages=converse_messages("[[sim:fail=throttle]]"))
    assert err.value.response["ResponseMetadata"]["RetryAttempts"] == 2
    sluice_retries = metric_value(proxy.metrics(), "sluice_upstream_retries_total") - before
    assert sim.stats()["models"][HAIKU]["requests"] == 3 + sluice_retries


def test_sluice_retries_upstream_throttles_within_its_budget(proxy: Sluice, sim: Simulator) -> None:
    client = bedrock_client(proxy.url)
    with pytest.raises(ClientError) as err:
        client.converse(modelId=HAIKU, messages=converse_messages("[[sim:fail=unavailable]]"))
    headers = err.value.response["ResponseMetadata"]["HTTPHeaders"]
    assert err.value.response["Error"]["Code"] == "ServiceUnavailableException"
    retries = int(headers.get("x-sluice-upstream-retries", "0"))
    # Policy default: at most 2 retries per call, 10% of calls over time (bucket starts full).
    assert 1 <= retries <= 2
    assert sim.stats()["models"][HAIKU]["requests"] == 1 + retries
    # A validation error is never retried.
    with pytest.raises(ClientError):
        client.converse(modelId=HAIKU, messages=[{"role": "assistant", "content": [{"text": "x"}]}])


def test_error_event_mid_stream_reaches_client_intact(client: Any) -> None:
    resp = client.converse_stream(
        modelId=HAIKU, messages=converse_messages("[[sim:fail=stream_error]] go")
    )
    with pytest.raises(EventStreamError):
        for _ in resp["stream"]:
            pass


async def test_first_stream_event_is_not_buffered(proxy: Sluice, sim: Simulator) -> None:
    sim.configure({"latency_scale": 1.0})
    try:
        body = anthropic_body("[[sim:output_tokens=240]] long story", max_tokens=400)
        async with aiohttp.ClientSession() as session:
            started = time.perf_counter()
            async with session.post(
                f"{proxy.url}/model/{HAIKU}/invoke-with-response-stream",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 200
                first = None
                async for _ in resp.content.iter_any():
                    if first is None:
                        first = time.perf_counter() - started
                total = time.perf_counter() - started
    finally:
        sim.configure({"latency_scale": 0.02})
    assert first is not None
    # 240 tokens at ~120 tok/s take ~2 s after the first token: a buffering proxy
    # would deliver the first byte at the end.
    assert total > 1.5
    assert first < total / 2


async def test_client_disconnect_mid_stream_cancels_upstream(proxy: Sluice, sim: Simulator) -> None:
    sim.configure({"latency_scale": 1.0})
    try:
        body = anthropic_body("[[sim:output_tokens=600]] very long", max_tokens=1000)
        async with aiohttp.ClientSession() as session:
            resp = await session.post(
                f"{proxy.url}/model/{HAIKU}/invoke-with-response-stream",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            await resp.content.readany()
            resp.close()  # drop the connection mid-stream
        deadline = time.monotonic() + 5
        stats = sim.stats()["models"][HAIKU]
        while time.monotonic() < deadline and (stats["cancelled"] < 1 or stats["in_flight"]):
            await asyncio.sleep(0.1)
            stats = sim.stats()["models"][HAIKU]
    finally:
        sim.configure({"latency_scale": 0.02})
    assert stats["cancelled"] == 1
    assert stats["in_flight"] == 0
    assert metric_value(proxy.metrics(), "sluice_stream_client_disconnects_total") >= 1


# -- bad input: every path answers in Bedrock's shape over a real socket --------------


async def _post(
    url: str, path: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST"
) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            url + path,
            data=body,
            headers=headers if headers is not None else {"Content-Type": "application/json"},
            skip_auto_headers=["Content-Type"],
        ) as resp,
    ):
        raw = await resp.read()
        return resp.status, dict(resp.headers), json.loads(raw) if raw else None


def _assert_error(
    status: int, headers: dict[str, str], body: Any, want_status: int, want_type: str, words: str
) -> None:
    assert status == want_status
    assert headers["x-amzn-ErrorType"].split(":")[0] == want_type
    assert headers["Content-Type"] == "application/json"
    assert words in body["message"], body


async def test_malformed_json_is_a_validation_error(proxy: Sluice) -> None:
    got = await _post(proxy.url, f"/model/{HAIKU}/invoke", b"{not json")
    _assert_error(*got, 400, "ValidationException", "not valid JSON")


async def test_invalid_utf8_is_a_validation_error(proxy: Sluice) -> None:
    got = await _post(proxy.url, f"/model/{HAIKU}/converse", b'{"messages": "\xff\xfe"}')
    _assert_error(*got, 400, "ValidationException", "not valid UTF-8")


async def test_missing_content_type_means_json_as_on_bedrock(proxy: Sluice) -> None:
    status, _, doc = await _post(proxy.url, f"/model/{HAIKU}/invoke", anthropic_body("x"), {})
    assert status == 200 and doc["type"] == "message"


async def test_upstream_gets_no_header_the_client_did_not_send(
    proxy: Sluice, sim: Simulator
) -> None:
    # An HTTP client library would add a User-Agent, an Accept, an Accept-Encoding or a
    # Content-Type of its own: Bedrock sees only what the client sent, re-signed.
    body = anthropic_body("x")
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST /model/{HAIKU}/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    status = await reader.readline()
    writer.close()
    assert b" 200 " in status
    seen = sim.stats()["requests"][-1]["headers"]
    assert sorted(seen) == ["authorization", "content-length", "host", "x-amz-date"]


async def test_non_json_content_type_is_a_validation_error(proxy: Sluice) -> None:
    got = await _post(
        proxy.url, f"/model/{HAIKU}/invoke", b"hello", headers={"Content-Type": "text/plain"}
    )
    _assert_error(*got, 400, "ValidationException", "Content-Type 'text/plain'")


async def test_content_type_is_read_as_a_media_type(proxy: Sluice) -> None:
    # RFC 9110 8.3.1: type and subtype compare without case; a substring 'json' is not JSON.
    path, body = f"/model/{HAIKU}/invoke", anthropic_body("x")
    for refused in ("text/x-notjson", "application/jsonl"):
        got = await _post(proxy.url, path, body, {"Content-Type": refused})
        _assert_error(*got, 400, "ValidationException", f"Content-Type '{refused}'")
    for accepted in ("Application/JSON", "application/json; charset=UTF-8", "text/json"):
        status, _, doc = await _post(proxy.url, path, body, {"Content-Type": accepted})
        assert (status, doc["type"]) == (200, "message"), accepted


def _rejections(p: Sluice) -> float:
    return metric_value(p.metrics(), "sluice_rejections_total", reason="ValidationException")


async def test_a_coded_body_is_a_validation_error_naming_content_encoding(proxy: Sluice) -> None:
    # Bedrock takes no coded bodies; Sluice refuses them unread (no inflating, no zlib
    # error), counted, with nothing in its log. b"notgzip" was a zlib.error: a 500 and a
    # traceback in the log.
    path, body = f"/model/{HAIKU}/invoke", anthropic_body("x")
    for coding, sent in [
        ("gzip", b"notgzip" * 10),
        ("gzip", gzip.compress(body)),
        ("deflate", zlib.compress(body)),
        ("br", b"notbrotli"),
        ("identity, gzip", gzip.compress(body)),
    ]:
        before = _rejections(proxy)
        headers = {"Content-Type": "application/json", "Content-Encoding": coding}
        got = await _post(proxy.url, path, sent, headers)
        _assert_error(*got, 400, "ValidationException", f"Content-Encoding '{coding}'")
        assert got[1]["Accept-Encoding"] == "identity"
        assert _rejections(proxy) == before + 1
    logged = proxy.stderr() + "\n".join(proxy.stdout_lines())
    assert "Traceback" not in logged and "unexpected failure" not in logged
    # 'identity' codes nothing: the body is served.
    headers = {"Content-Type": "application/json", "Content-Encoding": "identity"}
    status, _, doc = await _post(proxy.url, path, body, headers)
    assert (status, doc["type"]) == (200, "message")


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT"])
async def test_a_model_operation_called_with_another_method_is_a_405_naming_post(
    proxy: Sluice, method: str
) -> None:
    status, headers, _ = await _post(
        proxy.url, f"/model/{HAIKU}/converse", b"", headers={}, method=method
    )
    assert status == 405
    assert headers["Allow"] == "POST"  # RFC 9110 15.5.6
    assert headers["x-amzn-ErrorType"].startswith("UnknownOperationException")


@pytest.mark.parametrize(
    "model_path",
    [
        f"x/../{SONNET}",  # signed (and maybe routed by Bedrock) as sonnet, metered as 'x/..'
        f"x%2F..%2F{SONNET}",
        f"x/%2E%2E/{SONNET}",
        f"x/%2e/{SONNET}",
        f"x/./{SONNET}",
        f"x//{SONNET}",
        f"{SONNET}/",
        f"{SONNET}%2F",
    ],
)
async def test_a_model_id_with_dot_or_empty_segments_is_refused(
    proxy: Sluice, sim: Simulator, model_path: str
) -> None:
    # Over a raw socket: HTTP clients (yarl, urllib3) would remove the dot segments.
    request = (
        f"POST /model/{model_path}/converse HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    answer = await _raw(proxy.url, request.encode())
    head, _, body = answer.partition(b"\r\n\r\n")  # (one answer: no 100 Continue)
    assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"x-amzn-ErrorType: ValidationException:" in head
    message = json.loads(body)["message"]
    assert "at 'modelId' failed to satisfy" in message
    assert "'.' or '..' path segments" in message
    assert sim.stats()["requests"] == []  # nothing went upstream


async def _raw(url: str, data: bytes, then: bytes = b"") -> bytes:
    """Send ``data`` (and ``then`` once invited by a 100 Continue); the answers as bytes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if head.startswith(b"HTTP/1.1 100 "):
            writer.write(then)
            head += await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
        assert length is not None, head
        return head + await asyncio.wait_for(reader.readexactly(int(length.group(1))), 5)
    finally:
        writer.close()


async def test_expect_continue_with_an_oversized_length_gets_413_not_100(
    simulator: Simulator, make_sluice: Any
) -> None:
    # aiohttp's default expect handler invited the upload (100 Continue) and only then was
    # the body refused: the client sent 10 MB for nothing.
    policy = {"server": {"max_body_bytes": 1000}, "identity": {"default_workload": "w"}}
    p = make_sluice(upstream=simulator.url, policy={**policy, "workloads": {"w": {}}})
    head = (
        f"POST /model/{HAIKU}/invoke HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Expect: 100-continue\r\nContent-Length: {}\r\n{}\r\n"
    )
    before = _rejections(p)
    answer = await _raw(p.url, head.format(10_000_000, "").encode())
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"100 Continue" not in answer
    assert b"x-amzn-ErrorType: ValidationException" in answer
    assert b"(server.max_body_bytes)" in answer
    assert b"Connection: close" in answer  # the body is never coming: nor is another request
    # Like every answer Sluice makes, an id to find it by (the same in both headers).
    ids = re.search(rb"x-sluice-request-id: ([0-9a-f-]{36})\r\n", answer)
    assert ids is not None and b"x-amzn-RequestId: " + ids.group(1) in answer, answer[:400]
    assert _rejections(p) == before + 1
    # Within the limit the upload is still invited, and served.
    body = anthropic_body("x")
    answer = await _raw(p.url, head.format(len(body), "Connection: close\r\n").encode(), body)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "), answer[:200]


async def test_oversized_body_names_the_limit(simulator: Simulator, make_sluice: Any) -> None:
    p = make_sluice(
        upstream=simulator.url,
        policy={
            "server": {"max_body_bytes": 1000},
            "identity": {"default_workload": "w"},
            "workloads": {"w": {}},
        },
    )
    got = await _post(p.url, f"/model/{HAIKU}/invoke", anthropic_body("x" * 2000))
    _assert_error(*got, 413, "ValidationException", "at most 1000 bytes (server.max_body_bytes)")


async def test_oversized_chunked_body_is_refused_as_it_arrives(
    simulator: Simulator, make_sluice: Any
) -> None:
    # No Content-Length: the size is known once read (aiohttp's own cap is the limit + 1).
    policy = {"server": {"max_body_bytes": 1000}, "identity": {"default_workload": "w"}}
    p = make_sluice(upstream=simulator.url, policy={**policy, "workloads": {"w": {}}})
    for size, words in ((1001, "is 1001 bytes"), (5000, "is larger than that")):

        async def chunks(n: int = size) -> Any:
            yield b"x" * n

        async with aiohttp.ClientSession() as session:
            url = f"{p.url}/model/{HAIKU}/invoke"
            json_type = {"Content-Type": "application/json"}
            async with session.post(url, data=chunks(), headers=json_type) as resp:
                got = resp.status, dict(resp.headers), await resp.json()
        _assert_error(*got, 413, "ValidationException", words)


async def test_unknown_route_is_a_bedrock_error_not_html(proxy: Sluice) -> None:
    got = await _post(proxy.url, "/no/such/thing", b"{}")
    _assert_error(*got, 404, "UnknownOperationException", "/no/such/thing")


async def test_invalid_model_id_is_a_validation_error(proxy: Sluice) -> None:
    got = await _post(proxy.url, "/model/bad%20model%21/invoke", anthropic_body("x"))
    _assert_error(*got, 400, "ValidationException", "modelId")


async def test_unreachable_upstream_is_a_retryable_503(make_sluice: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    p = make_sluice(upstream=dead)
    got = await _post(p.url, f"/model/{HAIKU}/invoke", anthropic_body("x"))
    _assert_error(*got, 503, "ServiceUnavailableException", "could not reach the upstream")
    async with aiohttp.ClientSession() as session, session.get(p.url + "/readyz") as resp:
        assert resp.status == 503
        assert "upstream" in (await resp.json())["message"]


def test_health_and_readiness(proxy: Sluice) -> None:
    import urllib.request

    with urllib.request.urlopen(proxy.url + "/healthz") as resp:
        assert json.loads(resp.read())["status"] == "ok"
    with urllib.request.urlopen(proxy.url + "/readyz") as resp:
        doc = json.loads(resp.read())
    assert doc == {**doc, "status": "ready", "store": "ok", "upstream": "ok"}


def test_access_log_has_usage_and_no_prompt(client: Any, proxy: Sluice) -> None:
    secret_prompt = "my-private-prompt-words"
    resp = client.invoke_model(modelId=HAIKU, body=anthropic_body(secret_prompt))
    request_id = resp["ResponseMetadata"]["HTTPHeaders"]["x-sluice-request-id"]
    last = proxy.log_record(request_id)
    assert last["status"] == 200 and last["usage_known"] is True
    assert last["output_tokens"] > 0 and last["workload"] == "default"
    assert last["overhead_ms"] >= 0
    assert secret_prompt not in Path(proxy.stdout_path).read_text()


def test_streaming_usage_is_counted(client: Any, proxy: Sluice) -> None:
    before = metric_value(proxy.metrics(), "sluice_tokens_total", direction="output")
    resp = client.invoke_model_with_response_stream(
        modelId=HAIKU, body=anthropic_body("[[sim:output_tokens=25]] go")
    )
    for _ in resp["body"]:
        pass
    deadline = time.monotonic() + 3
    after = before
    while time.monotonic() < deadline and after - before < 25:
        time.sleep(0.05)
        after = metric_value(proxy.metrics(), "sluice_tokens_total", direction="output")
    assert after - before == 25


def test_anthropic_sdk_style_literal_colon_path(proxy: Sluice) -> None:
    # The Anthropic SDK leaves ':' unencoded in the model id; both forms must route.
    import urllib.request

    req = urllib.request.Request(
        f"{proxy.url}/model/{HAIKU}/invoke",
        data=anthropic_body("hi"),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req) as resp:
        assert json.loads(resp.read())["type"] == "message"


async def test_upstream_connections_are_reused_and_counted(
    simulator: Simulator, make_sluice: Any
) -> None:
    p = make_sluice(upstream=simulator.url, policy={"identity": {"default_workload": "w"},
                                                     "workloads": {"w": {}}})  # fmt: skip
    for _ in range(3):  # one after another: the same kept-alive connection each time
        status, _, _ = await _post(p.url, f"/model/{HAIKU}/invoke", anthropic_body("x"))
        assert status == 200
    text = p.metrics()
    assert metric_value(text, "sluice_upstream_connections", state="idle") == 1
    assert metric_value(text, "sluice_upstream_connections", state="busy") == 0


async def test_an_upstream_that_never_accepts_is_a_503_naming_the_connect_timeout(
    make_sluice: Any,
) -> None:
    with dead_address() as (host, port):
        policy = {"server": {"upstream_connect_timeout_seconds": 0.5},
                  "identity": {"default_workload": "w"}, "workloads": {"w": {}}}  # fmt: skip
        p = make_sluice(upstream=f"http://{host}:{port}", policy=policy)
        got = await _post(p.url, f"/model/{HAIKU}/invoke", anthropic_body("x"))
        _assert_error(*got, 503, "ServiceUnavailableException", "no connection within 0.5 s")


async def test_an_upstream_answer_that_is_not_http_is_a_503_naming_it(make_sluice: Any) -> None:
    async def garble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garble, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        p = make_sluice(upstream=f"http://127.0.0.1:{port}")
        got = await _post(p.url, f"/model/{HAIKU}/invoke", anthropic_body("x"))
        _assert_error(*got, 503, "ServiceUnavailableException", "bad answer from upstream")
    finally:
        server.close()
