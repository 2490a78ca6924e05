"""A policy switch in the middle of 200 streams: none lost, no lease left behind."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
import redis

from proxy.admission.model import plan_keys
from proxy.eventstream import EventStreamDecoder
from tests.support.fleet_ops import HAIKU, sluice_cli, wait_version, write_policy
from tests.support.processes import Simulator, Sluice
from tests.support.redis_fixtures import RedisServerProcess

STREAMS = 200


def stream_policy(pool: str, workload_concurrency: int) -> dict[str, Any]:
    return {
        "server": {"lease_ttl_seconds": 10},
        "identity": {"header_mode": True},
        "models": {pool: {"ids": [HAIKU], "concurrency": 400}},
        "workloads": {"w": {"limits": {"*": {"concurrency": workload_concurrency}}}},
    }


async def one_stream(session: aiohttp.ClientSession, url: str) -> tuple[int, list[str]]:
    """A ConverseStream of ~10 s (outlasts a policy apply on a loaded machine); (status, events)."""
    body = orjson.dumps(
        {
            "messages": [{"role": "user", "content": [{"text": "[[sim:output_tokens=500]] go"}]}],
            "inferenceConfig": {"maxTokens": 600},
        }
    )
    headers = {"Content-Type": "application/json", "x-sluice-workload": "w"}
    path = f"{url}/model/{quote(HAIKU, safe='')}/converse-stream"
    decoder, events = EventStreamDecoder(), []
    async with session.post(path, data=body, headers=headers) as resp:
        async for chunk in resp.content.iter_any():
            for msg in decoder.feed(chunk):
                kind = msg.headers.get(":event-type") or msg.headers.get(":exception-type")
                events.append(str(kind))
        return resp.status, events


@pytest.mark.slow
@pytest.mark.long  # 6-14 s: runs in `make test-all`, not in CI's `make test`
async def test_switch_during_200_streams_loses_none_and_leaks_no_lease(
    tmp_path: Path,
    make_simulator: Callable[..., Simulator],
    make_sluice: Callable[..., Sluice],
    redis_server: RedisServerProcess,
) -> None:
    sim = make_simulator({"latency_scale": 1.0})
    fleet_name, pool = f"streams-{uuid.uuid4().hex[:8]}", f"s{uuid.uuid4().hex[:8]}"
    first = write_policy(tmp_path, stream_policy(pool, 300))
    fleet = [
        make_sluice(
            upstream=sim.url,
            policy=str(first),
            redis_url=redis_server.url,
            extra_args=["--fleet", fleet_name],
        )
        for _ in range(3)
    ]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        calls = [asyncio.create_task(one_stream(session, fleet[i % 3].url)) for i in range(STREAMS)]
        deadline = time.monotonic() + 20
        while sim.stats()["models"].get(HAIKU, {}).get("in_flight", 0) < STREAMS:
            assert time.monotonic() < deadline, sim.stats()["models"].get(HAIKU)
            await asyncio.sleep(0.05)
        # All 200 are in flight: lower the workload's cap below them, mid-stream.
        lowered = write_policy(tmp_path, stream_policy(pool, 250))
        out = sluice_cli(
            "policy", "apply", str(lowered), "--redis-url", redis_server.url, "--fleet", fleet_name
        )
        assert out.returncode == 0, out.stderr
        await asyncio.to_thread(wait_version, fleet, 2)
        assert not all(c.done() for c in calls)  # the switch really happened mid-stream
        results = await asyncio.gather(*calls)
    assert [status for status, _ in results] == [200] * STREAMS
    for _, events in results:
        assert events[-2:] == ["messageStop", "metadata"], events[-3:]
    keys = plan_keys(pool, "w")
    client = redis.Redis.from_url(redis_server.url)
    try:
        deadline = time.monotonic() + 5
        while client.zcard(keys.pool_leases) or client.zcard(keys.workload_leases):
            assert time.monotonic() < deadline, client.zrange(keys.pool_leases, 0, 5)
            await asyncio.sleep(0.05)
    finally:
        client.close()
    assert sim.stats()["models"][HAIKU]["cancelled"] == 0
