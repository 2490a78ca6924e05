"""Priority hold (issue 9): while Bedrock throttles a class on a pool, lower classes wait.

The rules are pure (:class:`proxy.control.hold.PriorityHold`, checked on a clock we pass
in); the behaviour is checked end to end: real Sluice processes sharing a Redis fleet in
front of a simulator whose Sonnet throttles every call until the test lifts it.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError

from proxy.control.hold import PriorityHold
from proxy.control.window import PoolWindow, Window
from tests.support.processes import Simulator, Sluice, metric_value, workload_client

SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
ASK = [{"role": "user", "content": [{"text": "hi"}]}]

# --- the rules -------------------------------------------------------------------------


def test_a_throttled_class_holds_only_the_classes_below_it_for_the_hold_time() -> None:
    hold = PriorityHold(2.0)
    hold.throttled("sonnet", 1, now=100.0)
    assert hold.holder("sonnet", 0, now=100.5) is None  # a higher class is never held
    assert hold.holder("sonnet", 1, now=100.5) is None  # nor the class itself
    assert hold.holder("sonnet", 2, now=100.5) == 1
    assert hold.holder("haiku", 2, now=100.5) is None  # per pool
    assert hold.holder("sonnet", 2, now=102.0) is None  # over hold_s after the last throttle
    hold.throttled("sonnet", 1, now=101.5)  # each throttle extends it
    assert hold.holder("sonnet", 3, now=103.0) == 1
    hold.prune(now=104.0)
    assert hold.holder("sonnet", 3, now=103.0) is None  # pruned: nothing left to read


def test_the_highest_throttled_class_is_named_whatever_the_order() -> None:
    rng = random.Random(9)
    for _ in range(200):
        hold, now = PriorityHold(rng.uniform(0.5, 3.0)), 50.0
        throttled = {rng.randrange(5): now - rng.uniform(0, 4) for _ in range(rng.randrange(6))}
        for rank, at in sorted(throttled.items(), key=lambda kv: kv[1]):
            hold.throttled("p", rank, now=at)
        for rank in range(6):
            live = [r for r, at in throttled.items() if r < rank and at + hold._hold_s > now]
            assert hold.holder("p", rank, now=now) == (min(live) if live else None)


def test_the_fleet_window_holds_every_class_it_saw_throttled() -> None:
    hold = PriorityHold(2.0)
    by_class = {"P1": Window(requests=5, throttles=2), "P2": Window(requests=9), "x": Window(1, 1)}
    hold.hear("sonnet", PoolWindow(Window(), by_class, 0), {"P0": 0, "P1": 1, "P2": 2})
    assert hold.holder("sonnet", 2) == 1 and hold.holder("sonnet", 1) is None


# --- end to end ------------------------------------------------------------------------


def _policy(tag: str) -> dict[str, Any]:
    sonnet, haiku = f"sonnet{tag}", f"haiku{tag}"
    return {
        "identity": {"header_mode": True},
        "server": {
            "retry": {"max_retries": 1, "base_backoff_ms": 10},
            "adaptivity": {"tick_seconds": 0.25},
        },
        "models": {
            sonnet: {
                "ids": [SONNET],
                "concurrency": 20,
                "adaptive": {"floor": 2, "ceiling": 20, "interval_seconds": 1},
            },
            haiku: {"ids": [HAIKU], "concurrency": 20},
        },
        "priorities": {"P0": {"share": 1.0}, "P2": {"share": 0.5}, "batch": {"share": 0.3}},
        "workloads": {
            "orders": {"priority": "P0"},
            "browse": {"priority": "P2", "degrade": [haiku]},
            "analytics": {"priority": "batch"},
        },
    }


@pytest.fixture
def fleet(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> tuple[list[Sluice], Simulator, str]:
    # A simulator of its own: its faults outlive a test.
    sim = make_simulator({"models": {SONNET: {"faults": {"throttle_rate": 1.0}}}})
    tag = uuid.uuid4().hex[:8]
    joined = ["--fleet", f"hold-{tag}"]
    policy = _policy(tag)
    procs = [
        make_sluice(upstream=sim.url, policy=policy, redis_url=redis_server.url, extra_args=joined)
        for _ in range(2)
    ]
    return procs, sim, tag


def _sonnet_calls(sim: Simulator) -> int:
    return int(sim.stats()["models"].get(SONNET, {}).get("requests", 0))


def test_while_bedrock_throttles_p0_lower_classes_send_nothing_there(
    fleet: tuple[list[Sluice], Simulator, str],
) -> None:
    (a, b), sim, tag = fleet
    with pytest.raises(ClientError):  # P0 throttled on instance a, retries and all
        workload_client(a.url, "orders").converse(modelId=SONNET, messages=ASK)
    sent = _sonnet_calls(sim)
    assert sent >= 2
    # On a: P2 (with a chain) goes down it without touching Sonnet.
    reply = workload_client(a.url, "browse").converse(modelId=SONNET, messages=ASK)
    assert reply["ResponseMetadata"]["HTTPHeaders"]["x-sluice-pool"] == f"haiku{tag}"
    # On b, which saw no throttle itself: the fleet tells it within a tick or two.
    deadline = time.monotonic() + 5
    while metric_value(b.metrics(), "sluice_priority_holding", priority="P0") < 1:
        assert time.monotonic() < deadline, "instance b never heard of a's throttles"
        time.sleep(0.1)
    reply = workload_client(b.url, "browse").converse(modelId=SONNET, messages=ASK)
    assert reply["ResponseMetadata"]["HTTPHeaders"]["x-sluice-pool"] == f"haiku{tag}"
    # The batch class has no chain and no wait: Sluice's 429 naming the hold.
    with pytest.raises(ClientError) as info:
        workload_client(b.url, "analytics").converse(modelId=SONNET, messages=ASK)
    err = info.value.response
    assert err["Error"]["Code"] == "ThrottlingException"
    assert "throttling priority class 'P0'" in err["Error"]["Message"]
    assert err["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "1"
    assert _sonnet_calls(sim) == sent  # nothing of a lower class reached Sonnet
    refused = metric_value(b.metrics(), "sluice_refused_total", limit="priority_hold")
    assert refused == 2


def test_the_hold_ends_once_bedrock_stops_throttling(
    fleet: tuple[list[Sluice], Simulator, str],
) -> None:
    (a, _), sim, tag = fleet
    with pytest.raises(ClientError):
        workload_client(a.url, "orders").converse(modelId=SONNET, messages=ASK)
    sim.configure({"models": {SONNET: {"faults": {"throttle_rate": 0.0}}}})
    # Two ticks after the last throttle (0.5 s here) and a tick for the fleet's news.
    deadline = time.monotonic() + 5
    while True:
        reply = workload_client(a.url, "browse").converse(modelId=SONNET, messages=ASK)
        pool = reply["ResponseMetadata"]["HTTPHeaders"]["x-sluice-pool"]
        if pool == f"sonnet{tag}" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert pool == f"sonnet{tag}"
    workload_client(a.url, "analytics").converse(modelId=SONNET, messages=ASK)


def test_a_downgrade_is_not_sent_where_bedrock_throttles_a_higher_class(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    # P0 calls Haiku directly ("faq"); P2 falls back onto Haiku when Sonnet refuses it.
    # Haiku's pool sheds nothing (no adaptive limit, no breaker), as a fallback pool
    # often is. While Bedrock throttles P0 on Haiku, a P2 downgrade there would take a
    # slot P0 needs: load Sluice itself adds, which no caller without Sluice would send.
    sim = make_simulator(
        {"models": {m: {"faults": {"throttle_rate": 1.0}} for m in (SONNET, HAIKU)}}
    )
    tag = uuid.uuid4().hex[:8]
    policy = _policy(tag)
    policy["workloads"]["faq"] = {"priority": "P0", "models": [f"haiku{tag}"]}
    policy["workloads"]["browse"] = {
        "priority": "P2",
        "degrade": [f"haiku{tag}", "template"],
        "template": {"text": "Busy right now."},
    }
    proc = make_sluice(
        upstream=sim.url,
        policy=policy,
        redis_url=redis_server.url,
        extra_args=["--fleet", f"hold-{tag}"],
    )
    orders, faq = workload_client(proc.url, "orders"), workload_client(proc.url, "faq")
    browse = workload_client(proc.url, "browse")
    for client, model in ((orders, SONNET), (faq, HAIKU)):  # P0 throttled on both pools
        with pytest.raises(ClientError):
            client.converse(modelId=model, messages=ASK)
    haiku_calls = int(sim.stats()["models"][HAIKU]["requests"])
    reply = browse.converse(modelId=SONNET, messages=ASK)
    headers = reply["ResponseMetadata"]["HTTPHeaders"]
    assert headers["x-sluice-degraded"] == "template"  # the chain's next step
    assert int(sim.stats()["models"][HAIKU]["requests"]) == haiku_calls
