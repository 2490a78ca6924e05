"""Upstream failures while Sluice retries are answered in Bedrock's shape, never as Sluice's 500."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from proxy.app import Settings, build_app
from proxy.config import Policy

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
BODY = orjson.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]})


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
    policy = Policy.model_validate(
        {
            "identity": {"header_mode": True},
            "models": {"haiku": {"ids": [HAIKU]}},
            "workloads": {"chat": {}},
            "server": {"access_log": False},
        }
    )
    server = TestServer(build_app(policy, Settings(upstream=torn_throttle)))
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                server.make_url(f"/model/{HAIKU}/converse"),
                data=BODY,
                headers={"x-sluice-workload": "chat", "Content-Type": "application/json"},
            ) as resp,
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
