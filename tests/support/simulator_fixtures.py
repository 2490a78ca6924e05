"""Run the Bedrock simulator in-process on a real TCP port, with real clients pointed at it.

Not registered in conftest: import ``run_simulator`` where a test needs its own simulator.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import boto3
from aiohttp import web
from botocore.config import Config

from proxy.simulator import SimulatorConfig, build_simulator_app

ACCESS_KEY_ID = "AKIDSIMULATORTEST"
SECRET_ACCESS_KEY = "simulator-test-secret"
REGION = "us-east-1"

# One session for all clients: botocore caches the loaded service model per session, which
# makes each further client cheap to create.
_SESSION = boto3.session.Session()


@dataclass
class RunningSimulator:
    """A simulator listening on ``url``, plus an HTTP session for raw requests."""

    url: str
    app: web.Application
    http: aiohttp.ClientSession

    def client(
        self,
        *,
        access_key_id: str = ACCESS_KEY_ID,
        secret_access_key: str = SECRET_ACCESS_KEY,
        attempts: int = 1,
        pool: int = 10,
        read_timeout: float = 30,
    ) -> Any:
        """A real boto3 bedrock-runtime client: standard retry mode, ``attempts`` tries in all.

        (botocore's ``max_attempts`` counts retries *after* the first try; ``total_max_attempts``
        counts every try, which is what a test means by "one attempt".)
        """
        return _SESSION.client(
            "bedrock-runtime",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=Config(
                retries={"total_max_attempts": attempts, "mode": "standard"},
                max_pool_connections=pool,
                read_timeout=read_timeout,
            ),
        )

    async def stats(self) -> dict[str, Any]:
        """``GET /_sim/stats``."""
        async with self.http.get(self.url + "/_sim/stats") as resp:
            assert resp.status == 200
            return dict(await resp.json())

    async def model_stats(self, model_id: str) -> dict[str, Any]:
        """The counters of one model."""
        return dict((await self.stats())["models"][model_id])

    async def reset(self) -> None:
        """``POST /_sim/reset``."""
        async with self.http.post(self.url + "/_sim/reset") as resp:
            assert resp.status == 200

    async def configure(self, patch: dict[str, Any]) -> dict[str, Any]:
        """``POST /_sim/config``; asserts success and returns the new configuration."""
        async with self.http.post(self.url + "/_sim/config", data=json.dumps(patch)) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            return dict(body)


@asynccontextmanager
async def run_simulator(config: SimulatorConfig) -> AsyncIterator[RunningSimulator]:
    """Start the simulator on 127.0.0.1 (a free port) and stop it afterwards."""
    app = build_simulator_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as http:
            yield RunningSimulator(f"http://{host}:{port}", app, http)
    finally:
        await runner.cleanup()


def anthropic_body(text: str, max_tokens: int = 200, **extra: Any) -> bytes:
    """An InvokeModel body for Claude with one user message."""
    doc = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")
