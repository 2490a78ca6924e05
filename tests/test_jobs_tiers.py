"""Batch records run on their class's service tier, admitted on that tier's quota, as live calls."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from proxy.app import Settings, build_app
from proxy.config import Policy
from tests.support.admission_helpers import Backend
from tests.support.jobs_helpers import HAIKU, jsonl, record


async def test_batch_records_are_admitted_on_their_tiers_own_quota(
    backend: Backend, tmp_path: Path
) -> None:
    # The README's tier example: class batch runs on flex, whose own quota is 2 requests
    # (burst 2, 2/min). A live call of 'nightly' is admitted there; so must its batch records
    # be, not on the pool's default quota (600/min) where real-time classes live.
    pool = f"haiku{uuid.uuid4().hex[:8]}"
    policy = Policy.model_validate(
        {
            "identity": {"header_mode": True},
            "models": {
                pool: {
                    "ids": [HAIKU],
                    "requests_per_minute": 600,
                    "service_tiers": ["priority", "default", "flex"],
                    "tiers": {"flex": {"requests_per_minute": 2, "burst_requests": 2}},
                }
            },
            "priorities": {"P0": {"tier": "default"}, "batch": {"tier": "flex"}},
            "workloads": {"chat": {"priority": "P0"}, "nightly": {"priority": "batch"}},
            "server": {
                "access_log": False,
                "jobs": {"workers": 4, "sqlite_path": str(tmp_path / "jobs.sqlite3")},
            },
        }
    )
    server = TestServer(
        build_app(
            policy,
            Settings(upstream="simulator", redis_url=backend.url, fleet=f"test-{uuid.uuid4().hex}"),
        )
    )
    await server.start_server()
    headers = {"x-sluice-workload": "nightly"}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                server.make_url(f"/sluice/v1/batches?modelId={HAIKU}"),
                data=jsonl([record(i) for i in range(5)]),
                headers=headers,
            ) as resp:
                assert resp.status == 202, await resp.text()
                batch_id = json.loads(await resp.read())["batchId"]
            await asyncio.sleep(3)
            async with session.get(
                server.make_url(f"/sluice/v1/batches/{batch_id}"), headers=headers
            ) as resp:
                doc: dict[str, Any] = json.loads(await resp.read())
    finally:
        await server.close()
    assert doc["succeeded"] <= 2, doc
