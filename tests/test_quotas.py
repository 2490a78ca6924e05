"""Distributed quotas end to end: several Sluice processes, one Redis (or a cluster).

Clients are real boto3 clients in threads, spread over the instances; the simulator
records what really reached "Bedrock" (request counts, peak concurrency, tokens), so
every assertion compares the configured limit with what got through.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support.processes import Simulator, Sluice, bedrock_client, metric_value

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
LONG = pytest.mark.long  # boto3's own backoff between attempts: ~12 s a mode
_names = itertools.count()


def unique(prefix: str) -> str:
    """Pool names are Redis hash tags: a fresh one per test keeps tests independent."""
    return f"{prefix}{next(_names)}{uuid.uuid4().hex[:6]}"


def body(text: str = "hello", max_tokens: int = 50) -> bytes:
    return json.dumps(
        {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}],
        }
    ).encode()


def header_policy(
    pool: str,
    pool_limits: dict[str, Any],
    workloads: dict[str, Any],
    priorities: dict[str, Any] | None = None,
    **server: Any,
) -> dict[str, Any]:
    return {
        "server": {"lease_ttl_seconds": 5, **server},
        "identity": {"header_mode": True},
        "models": {pool: {"ids": [HAIKU], **pool_limits}},
        "priorities": priorities or {"default": {"share": 1.0}},
        "workloads": workloads,
    }


def client_for(url: str, workload: str, **kwargs: Any) -> Any:
    client = bedrock_client(url, **kwargs)

    def tag(request: Any, **_: Any) -> None:
        request.headers["x-sluice-workload"] = workload

    client.meta.events.register("before-sign.bedrock-runtime.*", tag)
    return client


def hammer(
    clients: list[Any], threads: int, seconds: float, payload: Callable[[], bytes] = body
) -> list[tuple[float, str]]:
    """Call invoke_model from ``threads`` threads for ``seconds``; (time, outcome) per call."""
    outcomes: list[tuple[float, str]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run(i: int) -> None:
        client = clients[i % len(clients)]
        while time.monotonic() < deadline:
            try:
                client.invoke_model(modelId=HAIKU, body=payload())
                outcome = "ok"
            except ClientError as exc:
                outcome = exc.response["Error"]["Code"]
            with lock:
                outcomes.append((time.monotonic(), outcome))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(threads)))
    return outcomes


@pytest.fixture(params=["redis", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    return str(request.getfixturevalue("redis_server").url)


def start_fleet(
    make_sluice: Callable[..., Sluice],
    n: int,
    upstream: str,
    policy: dict[str, Any],
    redis_url: str,
) -> list[Sluice]:
    return [make_sluice(upstream=upstream, policy=policy, redis_url=redis_url) for _ in range(n)]


@pytest.mark.slow
@pytest.mark.long
def test_request_rate_holds_across_four_instances(
    store_url: str, sim: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    pool = unique("rate")
    rpm, burst, seconds = 600.0, 5.0, 8.0
    policy = header_policy(pool, {"requests_per_minute": rpm, "burst_requests": burst}, {"w": {}})
    fleet = start_fleet(make_sluice, 4, sim.url, policy, store_url)
    clients = [client_for(p.url, "w") for p in fleet]
    start = time.monotonic()
    outcomes = hammer(clients, 32, seconds)
    elapsed = max(t for t, _ in outcomes) - start
    admitted = sum(1 for _, o in outcomes if o == "ok")
    refused = Counter(o for _, o in outcomes if o != "ok")
    expected = burst + rpm / 60 * elapsed
    assert set(refused) == {"ThrottlingException"}
    assert refused["ThrottlingException"] > admitted  # the limit was really under pressure
    assert abs(admitted - expected) <= 0.02 * expected + 1, (admitted, expected)
    assert sim.stats()["models"][HAIKU]["requests"] == admitted


@pytest.mark.slow
def test_concurrency_never_exceeds_the_pool_cap(
    store_url: str, make_simulator: Callable[..., Simulator], make_sluice: Callable[..., Sluice]
) -> None:
    sim = make_simulator({"latency_scale": 0.3})
    pool = unique("conc")
    policy = header_policy(pool, {"concurrency": 5}, {"w": {}})
    fleet = start_fleet(make_sluice, 4, sim.url, policy, store_url)
    outcomes = hammer([client_for(p.url, "w") for p in fleet], 32, 4.0)
    stats = sim.stats()["models"][HAIKU]
    assert stats["peak_concurrency"] == 5  # saturated, and never above the cap
    assert stats["throttled"] == 0
    assert Counter(o for _, o in outcomes).keys() == {"ok", "ThrottlingException"}
    # Every lease came back: the fleet is idle again.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and stats["in_flight"]:
        stats = sim.stats()["models"][HAIKU]
    text = "".join(p.metrics() for p in fleet)
    assert metric_value(text, "sluice_refused_total", limit="pool.concurrency") > 0


@pytest.mark.slow
def test_p2_flood_cannot_push_p0_below_its_share(
    redis_server: Any,
    make_simulator: Callable[..., Simulator],
    make_sluice: Callable[..., Sluice],
) -> None:
    sim = make_simulator({"latency_scale": 0.3})
    pool = unique("prio")
    policy = header_policy(
        pool,
        {"concurrency": 10},
        {"orders": {"priority": "P0"}, "browse": {"priority": "P2"}},
        priorities={"P0": {"share": 1.0}, "P2": {"share": 0.6}},
    )
    fleet = start_fleet(make_sluice, 2, sim.url, policy, redis_server.url)
    with ThreadPoolExecutor(2) as ex:
        flood = ex.submit(hammer, [client_for(p.url, "browse") for p in fleet], 24, 5.0)
        time.sleep(0.5)  # let the flood fill its share first
        orders = ex.submit(hammer, [client_for(p.url, "orders") for p in fleet], 4, 4.0)
        p2, p0 = flood.result(), orders.result()
    p0_ok = sum(1 for _, o in p0 if o == "ok")
    assert p0_ok / len(p0) >= 0.99, Counter(o for _, o in p0)
    assert sim.stats()["models"][HAIKU]["peak_concurrency"] <= 10
    assert any(o == "ThrottlingException" for _, o in p2)
    text = "".join(p.metrics() for p in fleet)
    assert (
        metric_value(text, "sluice_refused_total", workload="browse", limit="class.concurrency") > 0
    )
    assert metric_value(text, "sluice_refused_total", workload="orders") == 0


@pytest.mark.slow
def test_tokens_per_minute_hold_against_settled_usage(
    redis_server: Any, sim: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    pool = unique("tpm")
    tpm, burst, seconds = 60000.0, 10000.0, 6.0
    policy = header_policy(pool, {"tokens_per_minute": tpm, "burst_tokens": burst}, {"w": {}})
    fleet = start_fleet(make_sluice, 2, sim.url, policy, redis_server.url)
    start = time.monotonic()
    # Each call reserves ~2,000 tokens (max_tokens) but uses ~60: refunds must make
    # room for far more calls than the reservations alone would allow.
    outcomes = hammer(
        [client_for(p.url, "w") for p in fleet],
        8,
        seconds,
        payload=lambda: body("tell me about manga", max_tokens=2000),
    )
    elapsed = max(t for t, _ in outcomes) - start
    stats = sim.stats()["models"][HAIKU]
    used = stats["input_tokens"] + stats["output_tokens"]
    admitted = sum(1 for _, o in outcomes if o == "ok")
    assert used <= burst + tpm / 60 * elapsed + 2000
    reservation_only = (burst + tpm / 60 * elapsed) / 2000
    assert admitted > 3 * reservation_only, (admitted, reservation_only)
    assert any(o == "ThrottlingException" for _, o in outcomes)


@pytest.mark.slow
def test_killed_proxy_releases_its_leases_within_the_lease_ttl(
    redis_server: Any,
    make_simulator: Callable[..., Simulator],
    make_sluice: Callable[..., Sluice],
) -> None:
    sim = make_simulator({"latency_scale": 1.0})
    pool = unique("kill")
    ttl = 2.0
    policy = header_policy(pool, {"concurrency": 3}, {"w": {}}, lease_ttl_seconds=ttl)
    holder, other = start_fleet(make_sluice, 2, sim.url, policy, redis_server.url)
    long_body = body("[[sim:output_tokens=2000]] long", max_tokens=3000)
    holders = [client_for(holder.url, "w", read_timeout=60) for _ in range(3)]
    with ThreadPoolExecutor(3) as ex:
        futures = [
            ex.submit(c.invoke_model_with_response_stream, modelId=HAIKU, body=long_body)
            for c in holders
        ]
        streams = [f.result() for f in futures]  # all three hold a lease now
        probe = client_for(other.url, "w")
        with pytest.raises(ClientError) as err:
            probe.invoke_model(modelId=HAIKU, body=body())
        assert err.value.response["Error"]["Code"] == "ThrottlingException"
        assert "concurrent" in err.value.response["Error"]["Message"]
        holder.kill()  # SIGKILL: no settle, no goodbye
        killed = time.monotonic()
        while True:
            try:
                probe.invoke_model(modelId=HAIKU, body=body())
                break
            except ClientError:
                assert time.monotonic() - killed < ttl + 1.5, "leases leaked past their TTL"
                time.sleep(0.05)
        released_after = time.monotonic() - killed
        for s in streams:
            s["body"].close()
    assert released_after <= ttl + 1.5


def test_refusal_is_actionable_backpressure(
    redis_server: Any, sim: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    pool = unique("back")
    policy = header_policy(
        pool, {}, {"w": {"limits": {pool: {"requests_per_minute": 6, "burst_requests": 1}}}}
    )
    proxy = make_sluice(upstream=sim.url, policy=policy, redis_url=redis_server.url)
    client = client_for(proxy.url, "w")
    ok = client.invoke_model(modelId=HAIKU, body=body())
    headers = ok["ResponseMetadata"]["HTTPHeaders"]
    assert headers["ratelimit-policy"] == '"workload.requests_per_minute";q=6;w=60'
    assert headers["ratelimit"].startswith('"workload.requests_per_minute";r=0;t=')
    assert headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(ClientError) as err:
        client.invoke_model(modelId=HAIKU, body=body())
    resp = err.value.response
    assert resp["Error"]["Code"] == "ThrottlingException"
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 429
    message = resp["Error"]["Message"]
    assert "workload 'w'" in message and pool in message and "requests/min" in message
    h = resp["ResponseMetadata"]["HTTPHeaders"]
    retry_ms = int(h["retry-after-ms"])
    assert 0 < retry_ms <= 10_000 and h["x-amz-retry-after"] == str(retry_ms)
    assert int(h["retry-after"]) * 1000 >= retry_ms
    reset = int(h["ratelimit"].rpartition("t=")[2])
    assert int(h["retry-after"]) >= reset >= 0


@pytest.mark.parametrize(
    "mode",
    ["legacy", pytest.param("standard", marks=LONG), pytest.param("adaptive", marks=LONG)],
)
def test_boto3_retries_a_sluice_refusal_in_every_retry_mode(
    mode: str, redis_server: Any, sim: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    pool = unique("retry")
    policy = header_policy(pool, {"requests_per_minute": 1, "burst_requests": 1}, {"w": {}})
    proxy = make_sluice(upstream=sim.url, policy=policy, redis_url=redis_server.url)
    client = client_for(proxy.url, "w", retries={"total_max_attempts": 3, "mode": mode})
    client.invoke_model(modelId=HAIKU, body=body())
    with pytest.raises(ClientError) as err:
        client.invoke_model(modelId=HAIKU, body=body())
    assert err.value.response["Error"]["Code"] == "ThrottlingException"
    assert err.value.response["ResponseMetadata"]["RetryAttempts"] == 2
    refused = metric_value(
        proxy.metrics(), "sluice_refused_total", limit="pool.requests_per_minute"
    )
    assert refused == 3


def test_embedded_store_enforces_the_same_cap(
    make_simulator: Callable[..., Simulator], make_sluice: Callable[..., Sluice]
) -> None:
    sim = make_simulator({"latency_scale": 0.3})
    policy = header_policy("solo", {"concurrency": 3}, {"w": {}})
    proxy = make_sluice(upstream=sim.url, policy=policy)
    outcomes = hammer([client_for(proxy.url, "w")], 12, 2.5)
    assert sim.stats()["models"][HAIKU]["peak_concurrency"] == 3
    assert {o for _, o in outcomes} == {"ok", "ThrottlingException"}


def test_store_down_fails_open_or_closed_per_class(
    redis_factory: Any, sim: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    redis = redis_factory()
    pool = unique("down")
    policy = header_policy(
        pool,
        {"concurrency": 5},
        {"rt": {"priority": "rt"}, "batch": {"priority": "batch"}},
        priorities={
            "rt": {"share": 1.0, "on_store_failure": "open"},
            "batch": {"share": 0.4, "on_store_failure": "closed"},
        },
    )
    proxy = make_sluice(upstream=sim.url, policy=policy, redis_url=redis.url)
    client_for(proxy.url, "rt").invoke_model(modelId=HAIKU, body=body())
    redis.kill()
    started = time.monotonic()
    ok = client_for(proxy.url, "rt").invoke_model(modelId=HAIKU, body=body())
    assert ok["ResponseMetadata"]["HTTPHeaders"]["x-sluice-admission"] == "fail-open"
    assert time.monotonic() - started < 2.0  # bounded by the store timeout
    with pytest.raises(ClientError) as err:
        client_for(proxy.url, "batch").invoke_model(modelId=HAIKU, body=body())
    resp = err.value.response
    assert resp["Error"]["Code"] == "ServiceUnavailableException"
    assert "fails closed" in resp["Error"]["Message"]
    assert resp["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "1"
    text = proxy.metrics()
    assert metric_value(text, "sluice_fail_open_total", workload="rt") == 1
    assert metric_value(text, "sluice_store_errors_total", operation="admit") >= 2
