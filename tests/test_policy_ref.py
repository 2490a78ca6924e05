"""Hot-reload readiness: a request is decided wholly under the policy it started with."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

from proxy.app import POLICY, POLICY_REF, STORE, Settings, build_app
from proxy.config import Policy
from proxy.policy import CompiledPolicy
from tests.support.admission_helpers import eventually

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
BODY = orjson.dumps({"messages": [{"role": "user", "content": [{"text": "opening hours?"}]}]})


def policy(pool: str, template: str) -> Policy:
    # One slot, held by the test: every call waits, times out, and gets the template.
    return Policy.model_validate(
        {
            "identity": {"header_mode": True},
            "models": {pool: {"ids": [HAIKU], "concurrency": 1}},
            "workloads": {
                "faq": {
                    "max_wait_ms": 2000,
                    "degrade": ["template"],
                    "template": {"text": template},
                }
            },
        }
    )


async def test_policy_swapped_mid_request_applies_to_the_next_request_only() -> None:
    pool = f"haiku{uuid.uuid4().hex[:8]}"
    app = build_app(policy(pool, "old answer"), Settings(upstream="simulator"))
    server = TestServer(app)
    await server.start_server()
    try:
        store: Any = app[STORE]
        compiled = app[POLICY]
        info = compiled.workloads["faq"]
        assert (await store.admit(compiled.plan(info, compiled.pools[pool], "default"), 0)).admitted
        async with aiohttp.ClientSession() as session:

            async def ask() -> bytes:
                async with session.post(
                    server.make_url(f"/model/{HAIKU}/converse"),
                    data=BODY,
                    headers={"x-sluice-workload": "faq", "Content-Type": "application/json"},
                ) as response:
                    assert response.headers["x-sluice-degraded"] == "template"
                    return await response.read()

            first = asyncio.create_task(ask())
            await eventually(lambda: store.waiting(pool) == 1)  # decided under "old" so far
            app[POLICY_REF].swap(CompiledPolicy(policy(pool, "new answer")))
            assert b"old answer" in await first
            assert b"new answer" in await ask()
    finally:
        await server.close()
