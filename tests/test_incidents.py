"""Incidents 1–4 of scenarios.md, replayed against the simulator with several Sluice processes.

The simulator plays Bedrock's account quota (it answers 429 ThrottlingException past
it), Sluice's policy plays what the operators configured, and the assertions are the
outcomes the scenarios ask for. Durations are scaled down to keep CI fast.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from tests.support.load import Results, drive
from tests.support.processes import Simulator, Sluice, metric_value

SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
pytestmark = pytest.mark.slow


def tag() -> str:
    return uuid.uuid4().hex[:6]


def fleet(
    make_sluice: Any,
    n: int,
    sim: Simulator,
    policy: dict[str, Any],
    redis: str,
) -> list[Sluice]:
    return [make_sluice(upstream=sim.url, policy=policy, redis_url=redis) for _ in range(n)]


def sim_model(sim: Simulator, model: str) -> dict[str, Any]:
    return dict(sim.stats()["models"].get(model, {"requests": 0, "throttled": 0}))


def gauge(proxies: list[Sluice], name: str, **labels: str) -> float:
    return max(metric_value(p.metrics(), name, **labels) for p in proxies)


@pytest.mark.long
async def test_incident_1_flash_sale_keeps_p0_answering(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    # Bedrock grants 12 concurrent Sonnet calls; the pool was configured for 18 (too high,
    # like 50 against 40 in the incident). P2 browsing triples; P0 orders must keep going.
    sim = make_simulator(
        {
            "latency_scale": 0.5,
            "models": {
                SONNET: {"quotas": {"concurrency": 12}},
                HAIKU: {"quotas": {"concurrency": 30}},
            },
        }
    )
    t = tag()
    policy = {
        "identity": {"header_mode": True},
        "server": {"adaptivity": {"tick_seconds": 0.25}},
        "models": {
            f"sonnet{t}": {
                "ids": [SONNET],
                "concurrency": 18,
                "downgrade_to": f"haiku{t}",
                "adaptive": {
                    "floor": 4,
                    "ceiling": 18,
                    "interval_seconds": 1.0,
                    "decrease": 0.7,
                    "increase": 1,
                    "target_p99_ms": 5000,
                },
            },
            f"haiku{t}": {"ids": [HAIKU], "concurrency": 30},
        },
        # P0's callers keep slots whatever the limit shrinks to: the shares
        # below reserve them (a policy choice the incident's operators got wrong).
        "priorities": {"P0": {"share": 1.0}, "P1": {"share": 0.7}, "P2": {"share": 0.4}},
        "workloads": {
            "orders": {"priority": "P0"},
            "recommend": {"priority": "P1", "degrade": [f"haiku{t}"]},
            "browse": {
                "priority": "P2",
                "degrade": [f"haiku{t}", "template"],
                "template": {"text": "Busy right now - please retry shortly."},
            },
        },
    }
    proxies = fleet(make_sluice, 3, sim, policy, redis_server.url)
    urls = [p.url for p in proxies]
    p0, p2 = Results(), Results()
    started = time.monotonic()
    await asyncio.gather(
        drive(urls, "orders", SONNET, clients=3, seconds=14, results=p0, retries=2),
        drive(urls, "recommend", SONNET, clients=12, seconds=14, results=Results()),
        drive(urls, "browse", SONNET, clients=24, seconds=14, results=p2),
        _sample_after(sim, 7.0, mid := {}),
    )
    end = sim_model(sim, SONNET)
    settled_requests = end["requests"] - mid["requests"]
    settled_throttles = end["throttled"] - mid["throttled"]
    assert p0.success_rate() >= 0.99, p0.kinds()
    # After the controller settles, Bedrock (the simulator) throttles under 1%.
    assert settled_throttles <= 0.01 * settled_requests, (settled_throttles, settled_requests)
    assert mid["throttled"] > 0  # the configured limit really was above Bedrock's quota
    # The limit it started above the quota at was cut (by the throttle reflex or the
    # controller: both count in limit_changes). (It used to have to end
    # at <= 12; issue 9: refused demand now makes a pool probe for a raised quota, so the
    # limit may sit above 12 while Bedrock's throttles, asserted above, stay under 1%.)
    cuts = sum(
        metric_value(p.metrics(), "sluice_adaptive_limit_changes_total", direction="down")
        for p in proxies
    )
    assert cuts >= 1
    # P2 was downgraded or refused with Retry-After; never an unexplained error.
    kinds = p2.kinds()
    assert kinds["downgrade"] > 0
    assert set(kinds) <= {"ok", "downgrade", "template", "429:ThrottlingException"}
    assert all(o.retry_after for o in p2.outcomes if o.status == 429)
    assert time.monotonic() - started < 30


async def _sample_after(sim: Simulator, delay: float, into: dict[str, Any]) -> None:
    await asyncio.sleep(delay)
    into.update(await asyncio.to_thread(sim_model, sim, SONNET))


async def test_incident_2_batch_never_takes_real_time_slots(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator({"latency_scale": 0.5, "models": {HAIKU: {"quotas": {"concurrency": 10}}}})
    t = tag()
    policy = {
        "identity": {"header_mode": True},
        "models": {f"haiku{t}": {"ids": [HAIKU], "concurrency": 10}},
        "priorities": {"realtime": {"share": 1.0}, "batch": {"share": 0.4}},
        "workloads": {
            "chat": {"priority": "realtime"},
            "enrichment": {"priority": "batch", "limits": {"*": {"concurrency": 3}}},
        },
    }
    proxies = fleet(make_sluice, 2, sim, policy, redis_server.url)
    urls = [p.url for p in proxies]
    chat, batch = Results(), Results()
    await asyncio.gather(
        drive(urls, "enrichment", HAIKU, clients=30, seconds=6, results=batch),
        drive(urls, "chat", HAIKU, clients=6, seconds=6, results=chat),
    )
    assert chat.success_rate() == 1.0, chat.kinds()
    assert batch.success_rate() > 0  # batch still makes progress with its own slots
    assert sim.stats()["models"][HAIKU]["peak_concurrency"] <= 10
    assert sim.stats()["models"][HAIKU]["throttled"] == 0
    text = "".join(p.metrics() for p in proxies)
    assert metric_value(text, "sluice_refused_total", workload="chat") == 0
    assert (
        metric_value(
            text, "sluice_refused_total", workload="enrichment", limit="workload.concurrency"
        )
        > 0
    )


async def test_callers_exactly_at_the_concurrency_cap_are_never_refused(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    # Closed-loop callers as many as the cap: each sends its next call the moment it has
    # an answer, so its finished call's release must land before that answer leaves.
    sim = make_simulator({"latency_scale": 0.02})
    t = tag()
    policy = {
        "identity": {"header_mode": True},
        "models": {f"haiku{t}": {"ids": [HAIKU], "concurrency": 4}},
        "workloads": {"chat": {}},
    }
    proxies = fleet(make_sluice, 2, sim, policy, redis_server.url)
    chat = Results()
    await drive([p.url for p in proxies], "chat", HAIKU, clients=4, seconds=5, results=chat)
    assert len(chat.outcomes) > 300
    assert chat.success_rate() == 1.0, chat.kinds()
    assert sim.stats()["models"][HAIKU]["peak_concurrency"] <= 4


@pytest.mark.long
async def test_incident_3_limits_set_too_low_grow_to_the_quota(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    # Pinned at 15 after an incident; the account quota is now 80.
    sim = make_simulator(
        {"latency_scale": 1.0, "models": {SONNET: {"quotas": {"concurrency": 80}}}}
    )
    t = tag()
    policy = {
        "identity": {"header_mode": True},
        "server": {"adaptivity": {"tick_seconds": 0.25}},
        "models": {
            f"sonnet{t}": {
                "ids": [SONNET],
                "concurrency": 80,
                "adaptive": {
                    "initial": 15,
                    "floor": 5,
                    "ceiling": 80,
                    "interval_seconds": 1.0,
                    "increase": 10,
                    "target_p99_ms": 4000,
                },
            }
        },
        "workloads": {"chat": {}},
    }
    proxies = fleet(make_sluice, 2, sim, policy, redis_server.url)
    results = Results()
    await drive([p.url for p in proxies], "chat", SONNET, clients=90, seconds=12, results=results)
    stats = sim.stats()["models"][SONNET]
    assert gauge(proxies, "sluice_adaptive_limit", pool=f"sonnet{t}") >= 72
    assert stats["peak_concurrency"] >= 72
    assert stats["throttled"] <= 0.01 * stats["requests"]


@pytest.mark.long
async def test_incident_4_batch_pauses_while_real_time_is_slow_and_resumes(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator({"latency_scale": 0.1})
    t = tag()
    policy = {
        "identity": {"header_mode": True},
        "server": {"adaptivity": {"tick_seconds": 0.2, "pause_window_seconds": 1.5}},
        "models": {f"sonnet{t}": {"ids": [SONNET]}},
        "priorities": {"P0": {"share": 1.0, "target_p99_ms": 400}, "batch": {"share": 0.4}},
        "workloads": {
            "chat": {"priority": "P0"},
            "weekly-reco": {"priority": "batch", "pause": {"when_class": "P0", "factor": 2}},
        },
    }
    proxies = fleet(make_sluice, 2, sim, policy, redis_server.url)
    urls = [p.url for p in proxies]
    batch = Results()

    async def real_time_slows_down_then_recovers() -> None:
        await drive(urls, "chat", SONNET, clients=3, seconds=2, results=Results())
        await asyncio.to_thread(sim.configure, {"latency_scale": 1.2})  # p99 ≈ 1.5 s > 2×400 ms
        await drive(urls, "chat", SONNET, clients=3, seconds=4, results=Results())
        await asyncio.to_thread(sim.configure, {"latency_scale": 0.1})
        await drive(urls, "chat", SONNET, clients=3, seconds=5, results=Results())

    started = time.monotonic()
    await asyncio.gather(
        real_time_slows_down_then_recovers(),
        drive(urls, "weekly-reco", SONNET, clients=2, seconds=11, results=batch),
    )
    paused = [o for o in batch.outcomes if o.status == 429]
    assert paused, batch.kinds()
    first_pause = min(o.started for o in paused) - started
    last_pause = max(o.started for o in paused) - started
    assert 2.0 < first_pause < 6.0  # paused only after real time got slow
    resumed = [o for o in batch.outcomes if o.status == 200 and o.started - started > last_pause]
    assert resumed and last_pause < 10.5  # and running again after it recovered
    assert all(o.retry_after for o in paused)


async def test_breaker_opens_half_opens_and_closes(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator({"latency_scale": 0.05})
    t = tag()
    policy = {
        "identity": {"header_mode": True},
        "server": {"adaptivity": {"tick_seconds": 0.2}, "retry": {"max_retries": 0}},
        "models": {
            f"sonnet{t}": {
                "ids": [SONNET],
                "breaker": {
                    "threshold": 0.1,
                    "window_seconds": 2,
                    "min_requests": 10,
                    "open_seconds": 1,
                    "half_open_probes": 2,
                },
            }
        },
        "workloads": {"chat": {}},
    }
    proxies = fleet(make_sluice, 2, sim, policy, redis_server.url)
    urls = [p.url for p in proxies]
    states: list[float] = []

    async def watch(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            states.append(
                await asyncio.to_thread(gauge, proxies, "sluice_breaker_state", pool=f"sonnet{t}")
            )
            await asyncio.sleep(0.1)

    await asyncio.to_thread(sim.configure, {"models": {SONNET: {"faults": {"throttle_rate": 1.0}}}})
    failing = Results()
    await asyncio.gather(
        drive(urls, "chat", SONNET, clients=4, seconds=2, results=failing), watch(2.0)
    )
    assert 2.0 in states  # open
    opened = [o for o in failing.outcomes if o.error_type == "ThrottlingException"]
    upstream_calls = sim.stats()["models"][SONNET]["requests"]
    assert len(opened) > upstream_calls  # the breaker answered for Bedrock while open
    await asyncio.to_thread(sim.configure, {"models": {SONNET: {"faults": {"throttle_rate": 0.0}}}})
    healthy = Results()
    await asyncio.gather(
        drive(urls, "chat", SONNET, clients=2, seconds=4, results=healthy), watch(4.0)
    )
    assert states[-1] == 0.0  # closed again after successful probes
    assert healthy.since(healthy.outcomes[-1].started - 1.0)[0].status == 200
    text = "".join(p.metrics() for p in proxies)
    for to in ("open", "half_open", "closed"):
        assert metric_value(text, "sluice_breaker_transitions_total", to=to) >= 1, to
