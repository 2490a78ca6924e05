"""A requeued retry that meets a store outage is answered as the outage, not as a
slot that did not free.

``requeue`` turns every refusal of the re-admission into the same 429 "no slot under its
adaptive limit freed within N ms; retry in 1 s": a fail-closed workload whose quota store
went away while its throttled call waited is told to retry in a second against a
concurrency limit, instead of the 503 ServiceUnavailableException naming the store (with
its own Retry-After) that admission gives every other call of that workload.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from botocore.exceptions import ClientError

from tests.support.processes import Sluice, workload_client
from tests.support.requeue import SONNET, hold_and_orders, one_slot_sonnet


def _converse(client: Any, text: str) -> tuple[int, str, str]:
    msgs = [{"role": "user", "content": [{"text": text}]}]
    try:
        client.converse(modelId=SONNET, messages=msgs)
    except ClientError as exc:
        err = exc.response["Error"]
        return exc.response["ResponseMetadata"]["HTTPStatusCode"], err["Code"], err["Message"]
    return 200, "", ""


async def _throttled_then_store_lost(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> tuple[Sluice, tuple[int, str, str], tuple[int, str, str]]:
    """A fail-closed call Bedrock throttles; the store dies while it waits to requeue.
    (the proxy, that call's answer, the answer of the workload's next call)."""
    redis = redis_factory()
    sim = one_slot_sonnet(make_simulator)
    pool = f"sonnet{uuid.uuid4().hex[:8]}"
    adaptive = {"floor": 1, "initial": 4, "ceiling": 4, "interval_seconds": 1.0,
                "target_p99_ms": 10000}  # fmt: skip
    retry = {"max_retries": 5, "base_backoff_ms": 200, "max_backoff_ms": 400}
    policy = hold_and_orders(pool, 4, adaptive, retry, {"max_wait_ms": 3000})
    proxy: Sluice = make_sluice(upstream=sim.url, policy=policy, redis_url=redis.url)
    hold, orders = workload_client(proxy.url, "hold"), workload_client(proxy.url, "orders")
    holder = asyncio.create_task(
        asyncio.to_thread(_converse, hold, "long [[sim:output_tokens=120]]")
    )
    await asyncio.sleep(0.4)
    call = asyncio.create_task(asyncio.to_thread(_converse, orders, "now"))
    await asyncio.sleep(0.3)  # throttled by Bedrock, its slot given up: waiting to requeue
    redis.kill()
    first = await call
    await holder
    return proxy, first, await asyncio.to_thread(_converse, orders, "again")


async def test_requeue_answers_a_store_outage_as_one(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    _, (status, code, message), again = await _throttled_then_store_lost(
        redis_factory, make_simulator, make_sluice
    )
    # What every other call of this fail-closed workload gets now:
    assert again[0] == 503, again
    # Fails: 429 ThrottlingException "no slot under its adaptive limit freed within 3000 ms;
    # retry in 1 s".
    assert (status, code) == (again[0], again[1]), (status, code, message)


async def test_requeue_refusal_keeps_the_upstream_time_in_the_access_log(
    redis_factory: Any, make_simulator: Any, make_sluice: Any
) -> None:
    proxy, first, _ = await _throttled_then_store_lost(redis_factory, make_simulator, make_sluice)
    line = next(r for r in proxy.access_log() if r["workload"] == "orders")
    assert line["status"] == first[0]
    # Bedrock did answer this call (429) before Sluice gave up requeueing it. Fails:
    # requeue raises out of _send_with_retries, past forward's finally that sets
    # upstream_s (and call.upstream_status stays None: no sluice_upstream_latency sample).
    assert line["upstream_ms"] > 0, line
