"""Helpers shared by the admission tests: plans, backends, and a dump of a pool's state."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.cluster

from proxy.admission import AdmitPlan, Bucket
from proxy.admission.model import KEY_PREFIX
from proxy.backend.store import EmbeddedStore
from proxy.config import parse_policy
from proxy.policy import CompiledPolicy


def new_pool() -> str:
    """A pool name no other test uses (so tests can share one server, any slot)."""
    return f"pool-{uuid.uuid4().hex[:10]}"


def per_min(rpm: float, burst: float) -> Bucket:
    """A bucket from a per-minute quota."""
    return Bucket(rate_per_s=rpm / 60.0, burst=burst)


def plan(
    pool: str, workload: str = "chat", priority: str = "P0", share: float = 1.0, **limits: Any
) -> AdmitPlan:
    """A plan with only the given limits (``pool_requests=...`` etc.)."""
    fields: dict[str, Any] = {
        "pool_requests": None,
        "pool_tokens": None,
        "pool_concurrency": None,
        "workload_requests": None,
        "workload_tokens": None,
        "workload_concurrency": None,
    }
    fields.update(limits)
    return AdmitPlan(pool=pool, workload=workload, priority=priority, share=share, **fields)


@dataclass
class Backend:
    """Where a test's stores keep their state: ``embedded``, ``redis`` or ``cluster``."""

    kind: str
    url: str | None

    @property
    def shared(self) -> bool:
        """True when several store instances share state (not embedded)."""
        return self.url is not None

    def client(self) -> Any:
        """A synchronous redis-py client on the backend (for inspection)."""
        assert self.url is not None
        if self.url.startswith("redis+cluster://"):
            return redis.cluster.RedisCluster.from_url(self.url.replace("redis+cluster", "redis"))
        return redis.Redis.from_url(self.url)


def dump_state(backend: Backend, store: Any, pool: str) -> Any:
    """Everything stored for ``pool`` (TTLs left out: they tick), comparable with ==."""
    if isinstance(store, EmbeddedStore):
        p = store._pools.get(pool)
        if p is None:
            return None
        return (
            p.rtat,
            p.ttat,
            p.dyn,
            dict(p.leases.by_id),
            {k: (w.rtat, w.ttat, dict(w.leases.by_id)) for k, w in p.workloads.items()},
        )
    client = backend.client()
    try:
        out = {}
        for key in sorted(client.keys(f"{KEY_PREFIX}:{{{pool}}}:*")):
            kind = client.type(key)
            if kind == b"hash":
                out[key] = client.hgetall(key)
            elif kind == b"zset":
                out[key] = client.zrange(key, 0, -1, withscores=True)
            else:
                out[key] = client.get(key)
        return out
    finally:
        client.close()


def wait_queue(backend: Backend, store: Any, pool: str) -> list[str]:
    """Waiter ids in the pool's fleet queue, head first."""
    if isinstance(store, EmbeddedStore):
        p = store._pools.get(pool)
        return [] if p is None else [wid for _, wid in p.waiters.queue]
    client = backend.client()
    try:
        return [m.decode() for m in client.zrange(f"{KEY_PREFIX}:{{{pool}}}:waiters", 0, -1)]
    finally:
        client.close()


def wait_listed(backend: Backend, store: Any, pool: str) -> int:
    """Waiting requests the store knows of for ``pool`` (queued or not)."""
    if isinstance(store, EmbeddedStore):
        p = store._pools.get(pool)
        return 0 if p is None else len(p.waiters)
    client = backend.client()
    try:
        return int(client.zcard(f"{KEY_PREFIX}:{{{pool}}}:waiters:exp"))
    finally:
        client.close()


async def eventually(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``cond`` (a state check, not a sleep for ordering) until true or fail."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.002)


def shedding_policy(
    pool: str, adaptive: dict[str, Any], breaker: dict[str, Any], **rest: Any
) -> CompiledPolicy:
    """A policy with one pool of concurrency 40 that sheds (``adaptive`` and ``breaker``),
    plus the other top-level sections given (``priorities``, ``workloads``...)."""
    model = {"ids": [f"anthropic.{pool}"], "concurrency": 40, "adaptive": adaptive}
    return CompiledPolicy(
        parse_policy({"models": {pool: {**model, "breaker": breaker}}, **rest}), env={}
    )


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait (polling every 10 ms) until ``cond()`` holds; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
