"""Per-tier quotas (one atomic decision per call, on every store) and per-tier prices.

A pool may give a service tier its own quota (``models.<pool>.tiers``): calls sent on that
tier are admitted against it, in its own scope ``<pool>:tier:<tier>`` whose Redis keys keep
the pool's hash tag. Checked on the stores (embedded, Redis, Cluster), on the compiled
policy, and end to end through Sluice and the simulator over real sockets.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.exceptions import ClientError

from proxy.admission import Store
from proxy.admission.model import KEY_PREFIX
from proxy.backend.store import EmbeddedStore, open_store
from proxy.config import PolicyError, parse_policy
from proxy.policy import CompiledPolicy
from tests.support.admission_helpers import Backend, eventually, new_pool, per_min, plan
from tests.support.processes import Simulator, Sluice, metric_value
from tests.test_tiers import ASK, HAIKU, client_as

StoreFactory = Callable[[], Awaitable[Store]]


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    s = open_store(backend.url)
    await s.start()
    yield s
    await s.close()


def _stored(backend: Backend, store: Store, pool: str, names: list[str]) -> list[bool]:
    """Whether the store holds state under each name: a scope (embedded) or a Redis key."""
    if isinstance(store, EmbeddedStore):
        return [name in store._pools for name in names]
    client = backend.client()
    try:
        return [bool(client.exists(name)) for name in names]
    finally:
        client.close()


# --- the stores ---------------------------------------------------------------------------


async def test_a_tier_with_its_own_quota_is_decided_apart_from_the_pool(
    store: Store, backend: Backend
) -> None:
    pool = new_pool()
    flex = plan(pool, workload="nightly", pool_requests=per_min(2, 2), tier="flex")
    default = plan(pool, workload="nightly", pool_requests=per_min(2, 2))
    decisions = await asyncio.gather(*(store.admit(flex, 0) for _ in range(5)))
    assert sum(d.admitted for d in decisions) == 2
    assert {d.refused_by for d in decisions if not d.admitted} == {"pool.requests_per_minute"}
    # The flex quota is used up; the pool's own (default's) is untouched.
    assert all([(await store.admit(default, 0)).admitted for _ in range(2)])
    assert not (await store.admit(default, 0)).admitted
    tag = f"{KEY_PREFIX}:{{{pool}}}"  # the pool's hash tag on both: one cluster slot
    names = [f"{tag}:pool", f"{tag}:tier:flex"] if backend.shared else [pool, f"{pool}:tier:flex"]
    assert _stored(backend, store, pool, names) == [True, True]


async def test_a_tier_slot_freed_wakes_a_waiter_of_that_tier(store: Store) -> None:
    pool = new_pool()
    flex = plan(pool, pool_concurrency=1, tier="flex")
    held = await store.admit(flex, 0)
    assert held.admitted and held.lease is not None
    # Full on flex, free on the pool's own quota.
    assert (await store.admit(plan(pool, pool_concurrency=1), 0)).admitted
    waiter = asyncio.ensure_future(store.admit_waiting(flex, 0, 10_000))
    await eventually(lambda: store.waiting(f"{pool}:tier:flex") == 1)
    assert not waiter.done()
    store.settle(flex, held.lease, 0, 0)
    decision = await asyncio.wait_for(waiter, 8)
    assert decision.admitted and decision.binding == "pool.concurrency"


async def test_the_heartbeat_keeps_a_tier_lease_alive(store: Store) -> None:
    flex = plan(new_pool(), pool_concurrency=1, tier="flex", lease_ttl_ms=600)
    assert (await store.admit(flex, 0)).admitted
    await asyncio.sleep(1.5)  # 2.5 TTLs: only the heartbeat keeps the slot held
    refused = await store.admit(flex, 0)
    assert refused.refused_by == "pool.concurrency"


# --- the compiled policy ------------------------------------------------------------------


def _policy(**pool: Any) -> dict[str, Any]:
    return {
        "identity": {"header_mode": True, "default_workload": "chat"},
        "server": {"retry": {"max_retries": 0}},
        "models": {
            "haiku": {
                "ids": [HAIKU],
                "requests_per_minute": 600,
                "service_tiers": ["default", "flex", "priority"],
                "tiers": {"flex": {"requests_per_minute": 1, "burst_requests": 1}},
                "prices": {
                    "default": {"input_per_million": 0.25, "output_per_million": 1.25},
                    "flex": {"input_per_million": 0.125, "output_per_million": 0.625},
                },
                **pool,
            }
        },
        "priorities": {
            "P0": {"tier": "default", "tier_on_throttle": "priority"},
            "batch": {"tier": "flex", "share": 0.5},
        },
        "workloads": {"chat": {"priority": "P0"}, "nightly": {"priority": "batch"}},
    }


def test_the_plan_of_a_tier_with_a_quota_has_that_quota_in_its_scope() -> None:
    policy = CompiledPolicy(parse_policy(_policy()), env={})
    wl, pool = policy.workloads["nightly"], policy.pools["haiku"]
    flex = policy.plan(wl, pool, "batch", None, "flex")
    assert flex.scope == "haiku:tier:flex" and flex.keys.pool == "sluice:{haiku}:tier:flex"
    assert flex.pool_requests is not None and flex.pool_requests.burst == 1
    own = policy.plan(wl, pool, "batch")
    assert own.scope == "haiku" and own.keys.pool == "sluice:{haiku}:pool"
    # A tier without a quota of its own shares the pool's: the very same plan.
    assert policy.plan(wl, pool, "batch", None, "priority") is own
    assert policy.plan(wl, pool, "batch", None, "default") is own


def test_tiers_and_prices_must_name_offered_tiers() -> None:
    with pytest.raises(PolicyError, match="tiers/prices name tiers the pool does not offer: flex"):
        parse_policy(_policy(service_tiers=["default", "priority"]), "p.yaml")
    with pytest.raises(PolicyError, match=r"models\.haiku\.tiers\.default"):
        parse_policy(_policy(tiers={"default": {"requests_per_minute": 5}}), "p.yaml")


# --- end to end: Sluice -> simulator, on every store ----------------------------------------


def _sluice(
    backend: Backend,
    make_simulator: Callable[..., Simulator],
    make_sluice: Callable[..., Sluice],
    policy: dict[str, Any],
    sim_tiers: dict[str, Any] | None = None,
) -> tuple[Sluice, str]:
    """Sluice in front of a simulator; the pool renamed apart (Redis outlives a test)."""
    name = new_pool()
    policy["models"] = {name: policy["models"]["haiku"]}
    sim = make_simulator(
        {
            "latency_scale": 0,
            "models": {HAIKU: {"quotas": {"requests_per_minute": 1000}}},
            "service_tiers": sim_tiers or {},
        }
    )
    return make_sluice(upstream=sim.url, policy=policy, redis_url=backend.url), name


def test_a_flex_call_is_admitted_on_flex_quota_and_priced_at_flex(
    backend: Backend,
    make_simulator: Callable[..., Simulator],
    make_sluice: Callable[..., Sluice],
) -> None:
    proxy, name = _sluice(backend, make_simulator, make_sluice, _policy())
    reply = client_as(proxy.url, "nightly").converse(modelId=HAIKU, messages=ASK)
    assert reply["ResponseMetadata"]["HTTPHeaders"]["x-sluice-service-tier"] == "flex"
    with pytest.raises(ClientError) as info:
        client_as(proxy.url, "nightly").converse(modelId=HAIKU, messages=ASK)
    error = info.value.response
    assert error["Error"]["Code"] == "ThrottlingException"
    assert f"model pool '{name}' (service tier 'flex')" in error["Error"]["Message"]
    assert "requests/min" in error["Error"]["Message"]
    # The pool's own (default) quota is another: a default call still passes.
    chat = client_as(proxy.url, "chat").converse(modelId=HAIKU, messages=ASK)
    assert chat["ResponseMetadata"]["HTTPHeaders"]["x-sluice-service-tier"] == "default"

    metrics = proxy.metrics()
    flex_cost = metric_value(metrics, "sluice_cost_usd_total", workload="nightly", tier="flex")
    flex_usage = reply["usage"]
    expected = (flex_usage["inputTokens"] * 0.125 + flex_usage["outputTokens"] * 0.625) / 1e6
    assert flex_cost == pytest.approx(expected) and flex_cost > 0
    used = chat["usage"]
    expected = (used["inputTokens"] * 0.25 + used["outputTokens"] * 1.25) / 1e6
    assert metric_value(
        metrics, "sluice_cost_usd_total", workload="chat", tier="default"
    ) == pytest.approx(expected)


def test_a_p0_call_throttled_on_default_is_retried_on_priority_within_its_quota(
    backend: Backend,
    make_simulator: Callable[..., Simulator],
    make_sluice: Callable[..., Sluice],
) -> None:
    # Bedrock throttles every default call (its share can never be met), never priority ones;
    # Sluice's priority quota holds one call.
    policy = _policy(tiers={"priority": {"requests_per_minute": 1, "burst_requests": 1}})
    proxy, name = _sluice(
        backend, make_simulator, make_sluice, policy, {"default": {"quota_share": 0.0001}}
    )
    reply = client_as(proxy.url, "chat").invoke_model(
        modelId=HAIKU,
        body=json.dumps(
            {
                "anthropic_version": "bedrock-2023-05-31",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}],
            }
        ),
    )
    headers = reply["ResponseMetadata"]["HTTPHeaders"]
    assert headers["x-sluice-service-tier"] == "priority"
    assert headers["x-sluice-upstream-retries"] == "1"
    assert reply["serviceTier"] == "priority"

    # The priority quota is used up: the fallback is not made, Bedrock's throttle is shown.
    with pytest.raises(ClientError) as info:
        client_as(proxy.url, "chat").converse(modelId=HAIKU, messages=ASK)
    error = info.value.response
    assert error["Error"]["Code"] == "ThrottlingException"
    assert error["ResponseMetadata"]["HTTPHeaders"]["x-sluice-service-tier"] == "default"
    metrics = proxy.metrics()
    moved = {"from_tier": "default", "to_tier": "priority"}
    assert metric_value(metrics, "sluice_tier_fallbacks_total", **moved) == 1
    assert metric_value(metrics, "sluice_tier_fallbacks_refused_total", to_tier="priority") == 1
    # Every slot was given back: the held (throttled) one and the moved one.
    assert metric_value(metrics, "sluice_in_flight", pool=name) == 0


def test_a_call_its_tier_quota_refuses_is_admitted_on_the_fallback_tier_quota(
    backend: Backend,
    make_simulator: Callable[..., Simulator],
    make_sluice: Callable[..., Sluice],
) -> None:
    policy = _policy()
    policy["priorities"]["batch"]["tier_on_throttle"] = "default"
    proxy, _ = _sluice(backend, make_simulator, make_sluice, policy)
    nightly = client_as(proxy.url, "nightly")
    served = [
        nightly.converse(modelId=HAIKU, messages=ASK)["ResponseMetadata"]["HTTPHeaders"]
        for _ in range(2)
    ]
    # The flex quota holds one call: the second is admitted on default's, sent on default,
    # at once (no call wasted on a flex that Sluice knows is full).
    assert [h["x-sluice-service-tier"] for h in served] == ["flex", "default"]
    assert "x-sluice-upstream-retries" not in served[1]
    metrics = proxy.metrics()
    moved = {"from_tier": "flex", "to_tier": "default"}
    assert metric_value(metrics, "sluice_tier_fallbacks_total", **moved) == 1


def test_the_readme_tier_example_answers_as_the_readme_says(
    make_simulator: Callable[..., Simulator], make_sluice: Callable[..., Sluice]
) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text("utf-8")
    start = readme.index("cat > /tmp/tiers.yaml <<'EOF'\n")
    text = readme[readme.index("\n", start) + 1 : readme.index("\nEOF\n", start)]
    sim = make_simulator({"latency_scale": 0})
    proxy = make_sluice(upstream=sim.url, policy=yaml.safe_load(text))
    nightly = client_as(proxy.url, "nightly")
    tiers = [
        nightly.converse(modelId=HAIKU, messages=ASK)["ResponseMetadata"]["HTTPHeaders"][
            "x-sluice-service-tier"
        ]
        for _ in range(2)
    ]
    assert tiers == ["flex", "flex"]
    with pytest.raises(ClientError) as info:
        nightly.converse(modelId=HAIKU, messages=ASK)
    assert (
        "model pool 'haiku' (service tier 'flex') reached its requests/min limit"
        in (info.value.response["Error"]["Message"])
    )
    assert metric_value(proxy.metrics(), "sluice_cost_usd_total", tier="flex") > 0


def _flex_always_throttled(
    redis_server: Any,
    make_simulator: Callable[..., Simulator],
    make_sluice: Callable[..., Sluice],
    fallback: str | None,
) -> tuple[Sluice, str]:
    """Bedrock throttles every flex call (flex has its own quota); the breaker would open at
    2 throttles in 4 calls; batch falls back to ``fallback`` on a throttle."""
    breaker = {"threshold": 0.5, "window_seconds": 10, "min_requests": 4, "open_seconds": 30}
    policy = _policy(breaker=breaker)
    policy["server"]["adaptivity"] = {"tick_seconds": 0.2}
    policy["models"]["haiku"]["tiers"]["flex"] = {"requests_per_minute": 600}
    if fallback is not None:
        policy["priorities"]["batch"]["tier_on_throttle"] = fallback
    return _sluice(
        Backend("redis", redis_server.url), make_simulator, make_sluice, policy,
        {"flex": {"quota_share": 0.0001}},
    )  # fmt: skip


def test_throttles_on_a_tier_with_its_own_quota_do_not_open_the_pools_breaker(
    redis_server: Any, make_simulator: Callable[..., Simulator], make_sluice: Callable[..., Sluice]
) -> None:
    proxy, name = _flex_always_throttled(redis_server, make_simulator, make_sluice, None)
    nightly = client_as(proxy.url, "nightly")
    for _ in range(8):
        with pytest.raises(ClientError) as info:
            nightly.converse(modelId=HAIKU, messages=ASK)
        assert info.value.response["Error"]["Code"] == "ThrottlingException"
    time.sleep(1.5)  # several fleet ticks: an open breaker would show by now
    assert metric_value(proxy.metrics(), "sluice_breaker_state", pool=name) == 0
    chat = client_as(proxy.url, "chat").converse(modelId=HAIKU, messages=ASK)
    assert chat["ResponseMetadata"]["HTTPHeaders"]["x-sluice-service-tier"] == "default"


def test_a_flex_throttle_moved_to_default_is_not_counted_against_the_pools_breaker(
    redis_server: Any, make_simulator: Callable[..., Simulator], make_sluice: Callable[..., Sluice]
) -> None:
    # Each call moves to default, which answers: the pool's breaker sees only successes
    # (the flex throttle, counted as if it had been on default's quota, would open it).
    proxy, name = _flex_always_throttled(redis_server, make_simulator, make_sluice, "default")
    nightly = client_as(proxy.url, "nightly")
    for _ in range(6):
        headers = nightly.converse(modelId=HAIKU, messages=ASK)["ResponseMetadata"]["HTTPHeaders"]
        assert headers["x-sluice-service-tier"] == "default"
        assert headers["x-sluice-upstream-retries"] == "1"
    time.sleep(1.5)  # several fleet ticks: an open breaker would show by now
    assert metric_value(proxy.metrics(), "sluice_breaker_state", pool=name) == 0
