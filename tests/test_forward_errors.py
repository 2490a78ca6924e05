"""Upstream failures while Sluice retries are answered in Bedrock's shape, never as Sluice's 500."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import generate_latest

from proxy.app import METRICS, Settings, build_app
from proxy.config import Policy
from proxy.eventstream import EventStreamDecoder, event_frame

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
BODY = orjson.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]})


def _chat_policy(**server: float) -> Policy:
    """One pool, one workload named by header, no access log; ``server`` settings added."""
    return Policy.model_validate(
        {
            "identity": {"header_mode": True},
            "models": {"haiku": {"ids": [HAIKU]}},
            "workloads": {"chat": {}},
            "server": {"access_log": False, **server},
        }
    )


def _chat_call(session: aiohttp.ClientSession, server: TestServer, operation: str) -> Any:
    """The workload ``chat``'s call of ``operation`` on Haiku through ``server``."""
    return session.post(
        server.make_url(f"/model/{HAIKU}/{operation}"),
        data=BODY,
        headers={"x-sluice-workload": "chat", "Content-Type": "application/json"},
    )


@pytest.fixture
async def torn_throttle() -> AsyncIterator[str]:
    """An upstream that answers every call 429 ThrottlingException and drops the body."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 429 Too Many Requests\r\n"
            b"x-amzn-ErrorType: ThrottlingException:http://internal.amazon.com/\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"message": "Too many'
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def test_an_upstream_that_drops_a_retried_throttle_is_a_bedrock_shaped_503(
    torn_throttle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "test-key")
    policy = _chat_policy()
    server = TestServer(build_app(policy, Settings(upstream=torn_throttle)))
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession() as session,
            _chat_call(session, server, "converse") as resp,
        ):
            doc = await resp.json(content_type=None)
            error_type = resp.headers.get("x-amzn-ErrorType", "").partition(":")[0]
            status = resp.status
    finally:
        await server.close()
    # Sluice's own 500 says "Sluice failed unexpectedly": the upstream failed, not Sluice.
    assert (status, error_type) == (503, "ServiceUnavailableException"), doc


async def test_an_unknown_dashboard_asset_is_a_bedrock_shaped_404() -> None:
    policy = Policy.model_validate(
        {"models": {"haiku": {"ids": [HAIKU]}}, "server": {"access_log": False}}
    )
    server = TestServer(build_app(policy, Settings(upstream="simulator")))
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.make_url("/dashboard/nope.js")) as resp,
        ):
            status, headers, raw = resp.status, resp.headers, await resp.read()
    finally:
        await server.close()
    assert status == 404
    assert "x-amzn-ErrorType" in headers, raw  # aiohttp's text/plain "404: Not Found" is not
    assert "message" in orjson.loads(raw)


def _frames_then(after: str) -> Callable[..., Any]:
    """An upstream ConverseStream that sends messageStart, then ``after``: "stall" (nothing
    more, the connection held) or "cut" (the connection closed mid-answer)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        frame = event_frame("messageStart", b'{"role": "assistant"}')
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.amazon.eventstream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(frame), frame)
        )
        await writer.drain()
        if after == "stall":
            await reader.read()  # until Sluice hangs up
        writer.close()

    return serve


@pytest.mark.parametrize(
    ("after", "exception", "says"),
    [
        ("stall", "modelTimeoutException", "within the upstream read timeout"),
        ("cut", "internalServerException", "the upstream stream failed: Client"),
    ],
)
async def test_an_upstream_failing_mid_stream_ends_the_stream_with_an_exception_event(
    monkeypatch: pytest.MonkeyPatch, after: str, exception: str, says: str
) -> None:
    """Once a stream has started no HTTP error is possible: Sluice ends it with Bedrock's
    exception event (boto3 raises EventStreamError, never a truncated stream), counts it,
    and the upstream side is dropped."""
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "test-key")
    upstream = await asyncio.start_server(_frames_then(after), "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    policy = _chat_policy(upstream_read_timeout_seconds=0.3)
    app = build_app(policy, Settings(upstream=f"http://127.0.0.1:{port}"))
    server = TestServer(app)
    await server.start_server()
    decoder = EventStreamDecoder()
    kinds: list[str] = []
    messages: list[dict[str, Any]] = []
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            _chat_call(session, server, "converse-stream") as resp,
        ):
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                for msg in decoder.feed(chunk):
                    kinds.append(
                        str(msg.headers.get(":event-type") or msg.headers.get(":exception-type"))
                    )
                    if msg.headers.get(":message-type") == "exception":
                        messages.append(orjson.loads(msg.payload))
        metrics = generate_latest(app[METRICS].registry).decode()
    finally:
        await server.close()
        upstream.close()
        await upstream.wait_closed()
    assert kinds == ["messageStart", exception]
    assert len(messages) == 1 and says in messages[0]["message"]  # Bedrock's shape, the cause
    counted = f'sluice_upstream_errors_total{{error_type="{exception}",pool="haiku"}} 1.0'
    assert counted in metrics
