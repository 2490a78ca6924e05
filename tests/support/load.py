"""A closed-loop load driver for incident replays.

Incident tests need dozens of concurrent callers for tens of seconds; boto3 threads
would spend the 2 cores on boto3 itself, so the driver speaks the same wire shape
(InvokeModel with an Anthropic body, header-mode workload) over aiohttp. Every call's
outcome is recorded: status, error type, latency, what served it, and Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp


@dataclass(frozen=True, slots=True)
class Outcome:
    started: float
    latency_s: float
    status: int
    error_type: str | None
    degraded: str | None
    retry_after: str | None


@dataclass
class Results:
    outcomes: list[Outcome] = field(default_factory=list)

    def since(self, t: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.started >= t]

    def success_rate(self, outcomes: list[Outcome] | None = None) -> float:
        items = self.outcomes if outcomes is None else outcomes
        return sum(o.status == 200 for o in items) / max(1, len(items))

    def kinds(self) -> Counter[str]:
        return Counter(
            o.degraded or ("ok" if o.status == 200 else f"{o.status}:{o.error_type}")
            for o in self.outcomes
        )

    def p99(self) -> float:
        ok = sorted(o.latency_s for o in self.outcomes if o.status == 200)
        return ok[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else 0.0


def invoke_body(text: str = "hello", max_tokens: int = 60) -> bytes:
    return json.dumps(
        {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}],
        }
    ).encode()


async def drive(
    urls: list[str],
    workload: str,
    model_id: str,
    *,
    clients: int,
    seconds: float,
    results: Results,
    retries: int = 0,
    text: str = "hello",
) -> None:
    """``clients`` callers loop for ``seconds``; a refused caller honours Retry-After (≤ 0.5 s).

    ``retries`` extra attempts per call on 429/503, as boto3's standard mode would make.
    """
    path = f"/model/{quote(model_id, safe='')}/invoke"
    headers = {"Content-Type": "application/json", "x-sluice-workload": workload}
    body = invoke_body(text)
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def caller(i: int) -> None:
            url = urls[i % len(urls)] + path
            while time.monotonic() < deadline:
                started = time.monotonic()
                for attempt in range(retries + 1):
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                        etype = resp.headers.get("x-amzn-ErrorType", "").partition(":")[0] or None
                        degraded = resp.headers.get("x-sluice-degraded")
                        retry_after = resp.headers.get("retry-after-ms")
                    if status not in (429, 503) or attempt == retries:
                        break
                    await asyncio.sleep(min(0.5, int(retry_after or 100) / 1000))
                results.outcomes.append(
                    Outcome(
                        started, time.monotonic() - started, status, etype, degraded, retry_after
                    )
                )
                if status in (429, 503):
                    await asyncio.sleep(min(0.5, int(retry_after or 100) / 1000))

        await asyncio.gather(*(caller(i) for i in range(clients)))


def adaptive_fleet(
    make_sluice: Any,
    upstream: str,
    redis_url: str,
    pool: str,
    model_id: str,
    adaptive: dict[str, Any],
    *,
    instances: int = 3,
    max_wait_ms: int = 1000,
) -> list[Any]:
    """``instances`` Sluice processes of one fleet on one Redis, one adaptive pool serving
    ``model_id`` (concurrency = the adaptive ceiling), workload ``chat``, no upstream
    retries, a 0.25 s tick."""
    policy = {
        "identity": {"header_mode": True},
        "server": {"adaptivity": {"tick_seconds": 0.25}, "retry": {"max_retries": 0}},
        "models": {
            pool: {"ids": [model_id], "concurrency": adaptive["ceiling"], "adaptive": adaptive}
        },
        "workloads": {"chat": {"max_wait_ms": max_wait_ms}},
    }
    fleet = ["--fleet", f"fleet-{uuid.uuid4().hex}"]
    return [
        make_sluice(upstream=upstream, policy=policy, redis_url=redis_url, extra_args=fleet)
        for _ in range(instances)
    ]
