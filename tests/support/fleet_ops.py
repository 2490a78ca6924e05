"""Helpers for the fleet-operations tests: policies as files, the CLI, per-instance load."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

from tests.support.load import invoke_body
from tests.support.processes import ROOT, Sluice, http_json

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


def rate_policy(pool: str, rpm: float, burst: float, **workloads: Any) -> dict[str, Any]:
    """Header-mode policy: workload ``w`` limited to ``rpm`` on ``pool`` (plus ``workloads``)."""
    return {
        "server": {"lease_ttl_seconds": 5},
        "identity": {"header_mode": True},
        "models": {pool: {"ids": [HAIKU]}},
        "workloads": {
            "w": {"limits": {"*": {"requests_per_minute": rpm, "burst_requests": burst}}},
            **workloads,
        },
    }


def secret_policy(pool: str, rpm: float, env: str) -> dict[str, Any]:
    """A valid policy that compiles only where the environment variable ``env`` is set:
    an instance without it refuses the version (a secret missing on that host)."""
    policy = rate_policy(pool, rpm, 10)
    key = {"access_key_id": "AKIDSECRETPOLICY", "secret": {"env": env}}
    policy["workloads"]["w"]["access_keys"] = [key]
    return policy


def write_policy(directory: Path, policy: dict[str, Any] | str) -> Path:
    """The policy as a fresh YAML file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"policy-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(policy if isinstance(policy, str) else yaml.safe_dump(policy))
    return path


def sluice_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``sluice ARGS`` as a real process (the operator's view)."""
    env_path = {"PYTHONPATH": str(ROOT), "USER": "test-operator", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env_path,
    )


def policy_of(proxy: Sluice) -> dict[str, Any]:
    """``GET /sluice/v1/policy``."""
    return http_json("GET", proxy.url + "/sluice/v1/policy")  # type: ignore[no-any-return]


def wait_version(fleet: list[Sluice], version: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Block until every instance runs ``version``; return their policy views."""
    deadline = time.monotonic() + timeout
    while True:
        views = [policy_of(p) for p in fleet]
        if all(v["version"] == version for v in views):
            return views
        if time.monotonic() > deadline:
            raise AssertionError(f"not all on v{version}: {views}")
        time.sleep(0.02)


@dataclass
class Traffic:
    """Per-instance outcomes of a background load: (instance index, start time, status, body)."""

    records: list[tuple[int, float, int, str]] = field(default_factory=list)
    #: (start time, seconds) of every answered call, whatever its status.
    latencies: list[tuple[float, float]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def statuses(self) -> set[int]:
        return {r[2] for r in self.records}


async def call(session: aiohttp.ClientSession, url: str, workload: str = "w") -> tuple[int, str]:
    """One InvokeModel in header mode; (status, body text)."""
    headers = {"Content-Type": "application/json", "x-sluice-workload": workload}
    path = f"{url}/model/{quote(HAIKU, safe='')}/invoke"
    async with session.post(path, data=invoke_body(), headers=headers) as resp:
        return resp.status, await resp.text()


async def load(fleet: list[Sluice], traffic: Traffic, per_instance: int = 2) -> None:
    """Call every instance from ``per_instance`` loops (≈ 25 calls/s each) until stopped."""

    async def loop(session: aiohttp.ClientSession, i: int) -> None:
        while not traffic.stop.is_set():
            started = time.time()
            status, text = await call(session, fleet[i].url)
            traffic.records.append((i, started, status, text))
            traffic.latencies.append((started, time.time() - started))
            await asyncio.sleep(0.04)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(
            *(loop(session, i) for i in range(len(fleet)) for _ in range(per_instance))
        )
