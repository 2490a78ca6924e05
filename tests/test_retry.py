"""Upstream retries: what is retryable, full-jitter bounds, the retry budget, the deadline."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import Retry
from proxy.pipeline.retry import RetryBudget, backoff_s, next_delay, retryable

ratios = st.floats(min_value=0.0, max_value=1.0)
caps = st.floats(min_value=1.0, max_value=50.0)


# --- what is retryable -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (429, "ThrottlingException"),
        (429, "ModelNotReadyException"),
        (503, "ServiceUnavailableException"),
        (429, None),  # an intermediary's throttle, without Bedrock's error header
        (503, None),
    ],
)
def test_capacity_refusals_are_retryable(status: int, error_type: str | None) -> None:
    assert retryable(status, error_type)


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (500, "InternalServerException"),
        (408, "ModelTimeoutException"),
        (400, "ValidationException"),
        (400, "ServiceQuotaExceededException"),
        (403, "AccessDeniedException"),
        (404, "ResourceNotFoundException"),
        (413, "RequestEntityTooLargeException"),
        (424, "ModelErrorException"),
        (500, None),
        (400, None),
        # A stream that started (200) and then failed inside the event stream.
        (200, "ThrottlingException"),
        (200, None),
    ],
)
def test_failures_that_would_fail_again_are_not_retryable(
    status: int, error_type: str | None
) -> None:
    assert not retryable(status, error_type)


# --- backoff -----------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    attempt=st.integers(min_value=1, max_value=2_000),
    base_ms=st.integers(min_value=1, max_value=5_000),
    max_ms=st.integers(min_value=1, max_value=60_000),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_stays_inside_the_full_jitter_window(
    attempt: int, base_ms: int, max_ms: int, seed: int
) -> None:
    window_s = min(max_ms, base_ms * 2.0 ** min(attempt - 1, 64)) / 1000
    assert 0.0 <= backoff_s(attempt, base_ms, max_ms, random.Random(seed)) <= window_s


def test_backoff_spreads_over_the_whole_window() -> None:
    rng = random.Random(7)
    draws = [backoff_s(3, 100, 2_000, rng) for _ in range(2_000)]  # window: 400 ms
    assert min(draws) < 0.02 and max(draws) > 0.38
    assert 0.18 < sum(draws) / len(draws) < 0.22


def test_backoff_window_doubles_then_caps() -> None:
    rng = random.Random(1)
    assert max(backoff_s(1, 100, 2_000, rng) for _ in range(500)) <= 0.1
    assert max(backoff_s(2, 100, 2_000, rng) for _ in range(500)) > 0.1
    assert max(backoff_s(30, 100, 2_000, rng) for _ in range(500)) <= 2.0


def test_backoff_attempts_count_from_one() -> None:
    with pytest.raises(ValueError, match="count from 1"):
        backoff_s(0, 100, 2_000, random.Random(0))


# --- the retry budget --------------------------------------------------------------------


@settings(max_examples=300)
@given(ratio=ratios, cap=caps, ops=st.lists(st.booleans(), max_size=3_000))
def test_budget_never_grants_more_than_ratio_of_first_attempts_plus_cap(
    ratio: float, cap: float, ops: list[bool]
) -> None:
    budget = RetryBudget(ratio, cap)
    firsts = retries = 0
    for is_first in ops:
        if is_first:
            firsts += 1
            budget.on_first_attempt()
        elif budget.try_spend():
            retries += 1
        assert retries <= ratio * firsts + cap + 1e-9
        assert 0.0 <= budget.tokens <= cap


def test_budget_grants_exactly_one_retry_per_ten_first_attempts_at_ten_percent() -> None:
    budget = RetryBudget(0.1, cap=1.0)
    assert budget.try_spend()  # starts full
    assert not budget.try_spend()
    for _ in range(9):
        budget.on_first_attempt()
    assert not budget.try_spend()
    budget.on_first_attempt()  # ten deposits of 0.1: exactly one retry, no float shortfall
    assert budget.try_spend()
    assert not budget.try_spend()


def test_budget_deposits_stop_at_the_cap() -> None:
    budget = RetryBudget(1.0, cap=3.0)
    for _ in range(100):
        budget.on_first_attempt()
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]


def test_zero_ratio_disables_retries() -> None:
    budget = RetryBudget(0.0)
    budget.on_first_attempt()
    assert not budget.try_spend()


@pytest.mark.parametrize(("ratio", "cap"), [(-0.1, 10.0), (0.1, 0.5)])
def test_budget_rejects_nonsense_settings(ratio: float, cap: float) -> None:
    with pytest.raises(ValueError, match="retry budget"):
        RetryBudget(ratio, cap)


# --- next_delay: attempts, deadline, budget ----------------------------------------------

CFG = Retry(max_retries=2, budget_ratio=0.1, base_backoff_ms=100, max_backoff_ms=2_000)


def test_retries_stop_after_max_retries_without_spending_budget() -> None:
    budget, rng = RetryBudget(0.1, cap=5.0), random.Random(0)
    assert next_delay(1, CFG, None, budget, rng) is not None
    assert next_delay(2, CFG, None, budget, rng) is not None
    assert next_delay(3, CFG, None, budget, rng) is None
    assert budget.tokens == pytest.approx(3.0)


def test_no_retry_when_max_retries_is_zero() -> None:
    cfg = Retry(max_retries=0)
    assert next_delay(1, cfg, None, RetryBudget(1.0), random.Random(0)) is None


def test_no_retry_when_the_budget_is_empty() -> None:
    budget = RetryBudget(0.1, cap=1.0)
    assert budget.try_spend()
    assert next_delay(1, CFG, 30.0, budget, random.Random(0)) is None


def test_no_retry_when_the_deadline_leaves_no_time_for_the_call() -> None:
    budget = RetryBudget(0.1, cap=1.0)
    assert next_delay(1, CFG, 0.99, budget, random.Random(0)) is None
    assert next_delay(1, CFG, 0.4, budget, random.Random(0), min_call_s=0.5) is None
    assert budget.tokens == 1.0  # a refused retry spends nothing


@settings(max_examples=300)
@given(
    attempt=st.integers(min_value=1, max_value=5),
    remaining=st.floats(min_value=1.0, max_value=60.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_retry_delay_plus_minimal_call_fits_the_deadline(
    attempt: int, remaining: float, seed: int
) -> None:
    cfg = Retry(max_retries=5, base_backoff_ms=500, max_backoff_ms=20_000)
    delay = next_delay(attempt, cfg, remaining, RetryBudget(1.0), random.Random(seed))
    assert delay is not None
    assert 0.0 <= delay <= min(remaining - 1.0, 0.5 * 2 ** (attempt - 1))


@settings(max_examples=100)
@given(
    ratio=st.floats(min_value=0.0, max_value=1.0),
    calls=st.integers(min_value=1, max_value=2_000),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_a_throttling_storm_costs_at_most_ratio_extra_calls(
    ratio: float, calls: int, seed: int
) -> None:
    # Every upstream attempt is throttled: the worst case for retry amplification.
    cfg = Retry(max_retries=5, budget_ratio=ratio)
    budget, rng = RetryBudget(ratio, cap=10.0), random.Random(seed)
    upstream = 0
    for _ in range(calls):
        budget.on_first_attempt()
        upstream += 1
        attempt = 1
        while next_delay(attempt, cfg, 60.0, budget, rng) is not None:
            upstream += 1
            attempt += 1
        assert attempt - 1 <= cfg.max_retries
    assert upstream - calls <= ratio * calls + 10 + 1e-9
