"""The simulator's per-minute buckets may hold fewer seconds than Bedrock's minute."""

from __future__ import annotations

from proxy.simulator.config import QuotaConfig
from proxy.simulator.models import TokenBucket


def test_a_short_burst_makes_a_per_minute_quota_bind_at_once() -> None:
    bucket = TokenBucket(600, now=0.0, burst_s=5.0)  # 10 per second, 50 held
    taken = 0
    while bucket.available(1, 0.0):
        bucket.take(1, 0.0)
        taken += 1
    assert taken == 50  # a minute's bucket would have held 600
    assert bucket.available(10, 1.0) and not bucket.available(11, 1.0)  # refills at 10/s
    bucket.resize(1200, 1.0)
    assert bucket.capacity == 100 and bucket.rate == 20


def test_bedrock_holds_a_minute_by_default() -> None:
    assert QuotaConfig().burst_seconds == 60.0
    assert TokenBucket(600, now=0.0).capacity == 600
