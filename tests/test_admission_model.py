"""Properties of the pure decision arithmetic (mirrored by the Lua scripts)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.admission.model import (
    EPS,
    PoolView,
    bucket_verdict,
    evaluate,
    level,
    needed_level,
    refund,
    take,
)
from tests.support.admission_helpers import per_min, plan

rates = st.floats(min_value=0.001, max_value=50.0)  # per ms
bursts = st.floats(min_value=1.0, max_value=10_000.0)
shares = st.sampled_from([1.0, 0.85, 0.6, 0.4, 0.1])
steps = st.lists(
    st.tuples(st.floats(min_value=0, max_value=500), st.floats(min_value=0, max_value=20_000)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=bursts, share=shares, seq=steps)
def test_bucket_never_grants_more_than_burst_plus_refill(
    rate: float, burst: float, share: float, seq: list[tuple[float, float]]
) -> None:
    tat, now, granted, biggest = 0.0, 0.0, 0.0, 0.0
    for dt, cost in seq:
        now += dt
        lvl = level(tat, now, rate, burst)
        if bucket_verdict(lvl, cost, burst, share) == 0:
            tat = take(tat, now, cost, rate)
            granted += cost
            biggest = max(biggest, cost)
            after = level(tat, now, rate, burst)
            if cost <= share * burst:
                # a class never eats the headroom kept for higher ones
                assert after >= (1 - share) * burst - 1e-6 * max(1.0, burst)
    assert granted <= burst + rate * now + max(0.0, biggest - burst) + 1e-6 * max(1.0, granted)


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=bursts, share=shares, debt=st.floats(0, 20_000), cost=st.floats(0, 20_000))
def test_waiting_the_retry_hint_is_enough_and_not_too_much(
    rate: float, burst: float, share: float, debt: float, cost: float
) -> None:
    tat = debt / rate  # level at now=0 is burst - debt
    lvl = level(tat, 0.0, rate, burst)
    if bucket_verdict(lvl, cost, burst, share) == 0:
        return
    wait = (needed_level(cost, burst, share) - lvl) / rate
    assert wait > 0
    assert (
        bucket_verdict(level(tat, wait * (1 + 1e-9) + 1e-6, rate, burst), cost, burst, share) == 0
    )
    if wait > 1.0:
        assert bucket_verdict(level(tat, wait * 0.9, rate, burst), cost, burst, share) != 0


@settings(max_examples=300, deadline=None)
@given(
    rate=rates,
    burst=bursts,
    tat=st.floats(0, 1e7),
    now=st.floats(0, 1e7),
    amount=st.floats(-1e5, 1e5),
)
def test_refund_never_lifts_a_bucket_above_full(
    rate: float, burst: float, tat: float, now: float, amount: float
) -> None:
    after = level(refund(tat, now, amount, rate), now, rate, burst)
    assert after <= burst + EPS
    before = level(tat, now, rate, burst)
    if amount >= 0:
        assert after >= before - 1e-6 * max(1.0, abs(before))
    else:
        assert after <= before + 1e-6 * max(1.0, abs(before))


@settings(max_examples=200, deadline=None)
@given(share=shares, in_flight=st.integers(0, 30), limit=st.integers(0, 30))
def test_class_concurrency_ceiling_is_ceil_share_times_limit(
    share: float, in_flight: int, limit: int
) -> None:
    p = plan("pool", share=share, pool_concurrency=limit).params
    code, _ = evaluate(p, 0, 0.0, PoolView(0, 0, in_flight, limit, 0, 0, 0), None, None)
    admitted = code == 0
    assert admitted == (in_flight + 1 <= math.ceil(share * limit - 1e-9))
    if not admitted:
        assert code in (3, 6)
        assert (code == 3) == (in_flight + 1 > limit)


def test_several_refusals_name_the_longest_wait() -> None:
    p = plan("pool", pool_requests=per_min(60, 1), workload_requests=per_min(6, 1)).params
    view = PoolView(1000.0, 0, 0, -1, 10_000.0, 0, 0)  # both empty, workload slower
    code, wait = evaluate(p, 0, 0.0, view, None, None)
    assert code == 7 and wait == 10_000.0
