"""a throttled call is retried once capacity frees, not after a limit change that
cannot come.

``await_reaction`` keeps a requeued call out of admission until the pool's fleet limit
is *cut* after the throttled attempt's send (up to an interval and a tick). A limit at its
floor is never cut again, so the call sits out the whole wait without a slot and outside
the queue although Bedrock's slot freed long before. Before the change it was retried as
soon as there was headroom.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from botocore.exceptions import ClientError

from tests.support.processes import Sluice, workload_client
from tests.support.requeue import SONNET, hold_and_orders, one_slot_sonnet


def _converse(client: Any, text: str) -> int:
    msgs = [{"role": "user", "content": [{"text": text}]}]
    try:
        client.converse(modelId=SONNET, messages=msgs)
    except ClientError as exc:
        return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])
    return 200


async def test_throttled_call_at_the_floor_is_retried_once_bedrock_frees(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    sim = one_slot_sonnet(make_simulator)
    pool = f"sonnet{uuid.uuid4().hex[:8]}"
    # The limit sits at its floor: Bedrock's throttles cannot cut it further.
    adaptive = {"floor": 2, "initial": 2, "ceiling": 2, "interval_seconds": 4.0,
                "target_p99_ms": 10000}  # fmt: skip
    retry = {"max_retries": 5, "base_backoff_ms": 100, "max_backoff_ms": 300}
    policy = hold_and_orders(pool, 2, adaptive, retry, {"max_wait_ms": 6000})
    proxy: Sluice = make_sluice(upstream=sim.url, policy=policy, redis_url=redis_server.url)
    hold, orders = workload_client(proxy.url, "hold"), workload_client(proxy.url, "orders")
    holder = asyncio.create_task(asyncio.to_thread(_converse, hold, "[[sim:output_tokens=20]]"))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    status = await asyncio.to_thread(_converse, orders, "now")
    took = time.monotonic() - started
    assert await holder == 200
    assert status == 200
    # Bedrock's slot frees about a second in; the call needs about a second after that.
    # Fails: it waits out interval + tick (4.25 s) for a cut that never comes.
    assert took < 3.5, f"served after {took:.1f} s"
