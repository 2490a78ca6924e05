"""A throttled call of a class without a chain queues for a slot under the cut limit (issue 9).

Bedrock (the simulator) grants one Sonnet call at a time while a long P0 call holds it.
P2 calls (chain: Haiku) and a second P0 call then arrive together: Bedrock throttles them,
the breaker opens and the adaptive limit is cut to Bedrock's one slot. Retrying "into
headroom" would never happen now (no retries while the breaker is open, and the retried
call's own slot fills the cut limit), so the P0 caller would get Bedrock's 429. Re-entering
admission serves it: the throttled call gives its slot up, waits in priority order for one
under the cut limit, and is sent again as soon as the long call ends.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
import redis
from botocore.exceptions import ClientError

from tests.support.processes import (
    UPSTREAM_KEY_ID,
    UPSTREAM_SECRET,
    Sluice,
    bedrock_client,
    metric_value,
    workload_client,
)
from tests.support.requeue import SONNET, one_slot_sonnet

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


def _converse(url: str, workload: str, text: str) -> tuple[int, dict[str, str]]:
    """(status, response headers) of one Converse call through Sluice."""
    msgs = [{"role": "user", "content": [{"text": text}]}]
    try:
        reply = workload_client(url, workload).converse(modelId=SONNET, messages=msgs)
    except ClientError as exc:
        meta = exc.response["ResponseMetadata"]
        return meta["HTTPStatusCode"], meta["HTTPHeaders"]
    return 200, reply["ResponseMetadata"]["HTTPHeaders"]


def _policy(pool: str, breaker: dict[str, Any] | None, max_wait_ms: int) -> dict[str, Any]:
    """A Sonnet pool adaptive from 4 (``breaker``: with one), a Haiku pool, ``orders``
    (P0, no chain) and ``browse`` (P2, down to Haiku)."""
    adaptive = {
        "floor": 1,
        "initial": 4,
        "ceiling": 4,
        "interval_seconds": 0.25,
        "decrease": 0.5,
        "target_p99_ms": 10000,
    }
    sonnet: dict[str, Any] = {"ids": [SONNET], "concurrency": 4, "adaptive": adaptive}
    if breaker is not None:
        sonnet["breaker"] = breaker
    return {
        "identity": {"header_mode": True},
        "server": {
            "adaptivity": {"tick_seconds": 0.25},
            "retry": {"max_retries": 5, "base_backoff_ms": 200, "max_backoff_ms": 2000},
        },
        "models": {pool: sonnet, f"haiku{pool}": {"ids": [HAIKU], "concurrency": 10}},
        "priorities": {"P0": {"share": 1.0}, "P2": {"share": 1.0}},
        "workloads": {
            "orders": {"priority": "P0", "models": [pool], "max_wait_ms": max_wait_ms},
            "browse": {"priority": "P2", "degrade": [f"haiku{pool}"]},
        },
    }


@pytest.fixture
def stack(redis_server: Any, make_simulator: Any, make_sluice: Any) -> tuple[Sluice, str]:
    sim = one_slot_sonnet(make_simulator)
    pool = f"sonnet{uuid.uuid4().hex[:8]}"
    # One throttle opens it: with the reflex, the first throttle may be the only one.
    breaker = {"threshold": 0.5, "window_seconds": 2, "min_requests": 1, "open_seconds": 10}
    policy = _policy(pool, breaker, max_wait_ms=5000)
    return make_sluice(upstream=sim.url, policy=policy, redis_url=redis_server.url), pool


async def test_throttled_call_without_a_chain_waits_for_a_slot_under_the_cut_limit(
    stack: tuple[Sluice, str],
) -> None:
    proxy, pool = stack
    # The first call holds Bedrock's only slot for about two seconds.
    first = asyncio.create_task(
        asyncio.to_thread(_converse, proxy.url, "orders", "long [[sim:output_tokens=80]]")
    )
    await asyncio.sleep(0.4)
    started = time.monotonic()
    browse = [asyncio.to_thread(_converse, proxy.url, "browse", f"b{i}") for i in range(4)]
    *degraded, (status, headers) = await asyncio.gather(
        *browse, asyncio.to_thread(_converse, proxy.url, "orders", "second")
    )
    took = time.monotonic() - started
    assert (await first)[0] == 200
    assert all(s == 200 and h["x-sluice-degraded"] == "downgrade" for s, h in degraded)
    text = proxy.metrics()
    # Bedrock's throttles opened the breaker and cut the limit (the situation under test)...
    assert metric_value(text, "sluice_breaker_state", pool=pool) == 2
    assert metric_value(text, "sluice_adaptive_limit", pool=pool) < 4
    # ...and the throttled P0 call was served on a new slot, not answered with a 429.
    assert status == 200, headers
    # Usually Bedrock throttled it first and it was served on a new slot (retries >= 1);
    # in one clean-clone run it was instead held in admission by the cut limit and sent once
    # Bedrock's slot had freed: also no 429, which is the contract asserted here (the
    # requeue itself is pinned by tests/test_requeue_*.py).
    assert took < 6.0
    assert metric_value(text, "sluice_upstream_retry_requeue_refused_total", pool=pool) == 0
    assert metric_value(text, "sluice_in_flight", pool=pool) == 0  # every slot given back


def _one_slot_stack(
    redis_server: Any, make_simulator: Any, make_sluice: Any, max_wait_ms: int, initial: int
) -> tuple[Sluice, Any, str]:
    """Sluice (no breaker, the adaptive limit starting at ``initial``) on a one-slot Sonnet."""
    sim = one_slot_sonnet(make_simulator)
    pool = f"sonnet{uuid.uuid4().hex[:8]}"
    policy = _policy(pool, None, max_wait_ms=max_wait_ms)
    policy["models"][pool]["adaptive"]["initial"] = initial
    proxy = make_sluice(upstream=sim.url, policy=policy, redis_url=redis_server.url)
    return proxy, sim, pool


async def test_a_throttle_is_not_retried_into_the_limit_the_reflex_just_lowered(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    """A class with a chain, throttled on a limit above Bedrock's quota, goes down its chain
    instead of retrying into the same throttle: its headroom is judged once the throttle
    reflex has lowered the limit, not under the one the call was admitted under (before,
    the retry was judged at the 429 and cost Bedrock a second throttle)."""
    proxy, sim, pool = _one_slot_stack(redis_server, make_simulator, make_sluice, 0, initial=4)
    # One call holds Bedrock's only Sonnet slot for about two seconds, under a limit of 4.
    first = asyncio.create_task(
        asyncio.to_thread(_converse, proxy.url, "orders", "long [[sim:output_tokens=80]]")
    )
    await asyncio.sleep(0.6)  # a tick or two: the fleet in-flight read is 1, the limit 4
    status, headers = await asyncio.to_thread(_converse, proxy.url, "browse", "b")
    assert status == 200 and headers["x-sluice-degraded"] == "downgrade", headers
    assert (await first)[0] == 200
    assert sim.stats()["models"][SONNET]["throttled"] == 1  # the browse call's one attempt
    text = proxy.metrics()
    assert metric_value(text, "sluice_upstream_retries_total", pool=pool) == 0
    assert metric_value(text, "sluice_adaptive_limit", pool=pool) == 1  # the reflex's cut


async def test_a_throttle_that_finds_no_headroom_is_answered_with_bedrocks_429(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    """A class without a chain at the floor waits for headroom (up to its ``max_wait_ms``);
    none comes while a client that bypasses Sluice holds Bedrock's only slot, so the caller
    gets Bedrock's throttle with Retry-After -- the answer read before the wait, not a 503
    (a released answer cannot be read again)."""
    # At its floor: a throttled call of a class without a chain waits instead of requeueing.
    proxy, sim, pool = _one_slot_stack(redis_server, make_simulator, make_sluice, 300, initial=1)
    direct = bedrock_client(sim.url, key_id=UPSTREAM_KEY_ID, secret=UPSTREAM_SECRET)
    msgs = [{"role": "user", "content": [{"text": "long [[sim:output_tokens=80]]"}]}]
    first = asyncio.create_task(asyncio.to_thread(direct.converse, modelId=SONNET, messages=msgs))
    await asyncio.sleep(0.6)
    status, headers = await asyncio.to_thread(_converse, proxy.url, "orders", "o")
    assert (await first)["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert status == 429, headers
    assert headers["x-amzn-errortype"].startswith("ThrottlingException"), headers
    assert "retry-after" in headers, headers
    assert sim.stats()["models"][SONNET]["throttled"] == 1  # judged, never retried into it
    text = proxy.metrics()
    assert metric_value(text, "sluice_upstream_retries_total", pool=pool) == 0


def _impatient_orders(url: str, read_timeout: float = 0.5) -> Any:
    """A boto3 client of ``orders`` that gives up after ``read_timeout`` (and closes its
    socket)."""
    client = bedrock_client(url, read_timeout=read_timeout)
    client.meta.events.register(
        "before-sign.bedrock-runtime.*",
        lambda request, **_: request.headers.__setitem__("x-sluice-workload", "orders"),
    )
    return client


async def test_a_caller_that_leaves_during_the_wait_for_headroom_leaves_nothing_behind(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    """The caller hangs up while its throttled call waits for headroom: no retry goes to
    Bedrock, the slot is given back, and the next call is served once Bedrock's slot
    frees."""
    proxy, sim, pool = _one_slot_stack(redis_server, make_simulator, make_sluice, 600, initial=1)
    direct = bedrock_client(sim.url, key_id=UPSTREAM_KEY_ID, secret=UPSTREAM_SECRET)
    msgs = [{"role": "user", "content": [{"text": "long [[sim:output_tokens=80]]"}]}]
    first = asyncio.create_task(asyncio.to_thread(direct.converse, modelId=SONNET, messages=msgs))
    await asyncio.sleep(0.6)
    impatient = _impatient_orders(proxy.url, read_timeout=0.3)
    one = [{"role": "user", "content": [{"text": "o"}]}]
    with pytest.raises(Exception, match=r"(?i)timeout|timed out"):
        await asyncio.to_thread(impatient.converse, modelId=SONNET, messages=one)
    assert (await first)["ResponseMetadata"]["HTTPStatusCode"] == 200
    await asyncio.sleep(0.5)  # a tick: the fleet has read the released slot
    assert sim.stats()["models"][SONNET]["throttled"] == 1
    text = proxy.metrics()
    assert metric_value(text, "sluice_upstream_retries_total", pool=pool) == 0
    assert metric_value(text, "sluice_in_flight", pool=pool) == 0  # its slot given back
    assert (await asyncio.to_thread(_converse, proxy.url, "orders", "after"))[0] == 200


async def test_a_caller_that_leaves_during_the_requeue_is_not_sent_again(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    """Its throttled call gave its slot up and queues for a new one under the cut limit;
    the caller's client times out and closes its socket. Its FIN looks like a half-close
    until Sluice's probe draws a reset: the handler is cancelled, so no retry goes to
    Bedrock when the long call frees the slot (before, it was sent for nobody), and the
    access log says 499."""
    proxy, sim, pool = _one_slot_stack(redis_server, make_simulator, make_sluice, 3000, initial=4)
    first = asyncio.create_task(
        asyncio.to_thread(_converse, proxy.url, "orders", "long [[sim:output_tokens=80]]")
    )
    await asyncio.sleep(0.6)  # the long call holds Bedrock's only slot, under a limit of 4
    impatient = _impatient_orders(proxy.url)
    one = [{"role": "user", "content": [{"text": "o"}]}]
    with pytest.raises(Exception, match=r"(?i)timeout|timed out"):
        await asyncio.to_thread(impatient.converse, modelId=SONNET, messages=one)
    impatient.close()
    assert (await first)[0] == 200
    await asyncio.sleep(1.0)  # the slot it queued for has been free for a while
    stats = sim.stats()["models"][SONNET]
    assert (stats["requests"], stats["throttled"]) == (2, 1)  # the long call, the throttle
    gone = [r for r in proxy.access_log() if r.get("status") == 499]
    assert len(gone) == 1 and gone[0]["disconnected"] is True, proxy.access_log()
    text = proxy.metrics()
    assert metric_value(text, "sluice_in_flight", pool=pool) == 0
    assert (await asyncio.to_thread(_converse, proxy.url, "orders", "after"))[0] == 200


def _fleet_throttles(redis_url: str, pool: str) -> int:
    """Throttles the fleet's control loops counted for ``pool`` (every class, every bucket)."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return sum(
            int(v)
            for key in r.scan_iter(f"sluice:{{{pool}}}:fleet:*")
            for k, v in r.hgetall(key).items()
            if k.startswith("t|")
        )
    finally:
        r.close()


async def test_a_requeue_that_finds_no_slot_reports_its_throttle_once(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    """The throttle was reported when the call gave its slot up; reported again when the
    call settled with no slot found, it reached the controller and the breaker twice, the
    second time up to ``max_wait_ms`` late, in a bucket whose in-flight had long fallen
    (sweep seed 6: a quota learned as 3 where Bedrock granted 10, held for 22 s)."""
    proxy, sim, pool = _one_slot_stack(redis_server, make_simulator, make_sluice, 300, initial=4)
    first = asyncio.create_task(
        asyncio.to_thread(_converse, proxy.url, "orders", "long [[sim:output_tokens=80]]")
    )
    await asyncio.sleep(0.6)  # the long call holds Bedrock's only slot, under a limit of 4
    status, headers = await asyncio.to_thread(_converse, proxy.url, "orders", "o")
    assert status == 429 and headers.get("retry-after")
    assert (await first)[0] == 200
    await asyncio.sleep(0.8)  # a few ticks: every instance's counts are in the fleet buckets
    text = proxy.metrics()
    assert metric_value(text, "sluice_upstream_retry_requeue_refused_total", pool=pool) == 1
    assert sim.stats()["models"][SONNET]["throttled"] == 1
    assert _fleet_throttles(redis_server.url, pool) == 1
