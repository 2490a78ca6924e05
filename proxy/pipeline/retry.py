"""Upstream retries that stay inside the caller's deadline and a retry budget (incident 5).

Sluice retries only what Bedrock refused for capacity before doing any work (throttles,
model not ready, service unavailable), only while the caller is still waiting for an answer,
and only as a bounded fraction of first attempts. The fraction matters most: during a
throttling storm every layer that retries multiplies load on a quota that is already spent
(boto3's own retries × Sluice's × a queue's redeliveries was how jobs reached the dead-letter
queue in incident 5). A retry budget caps Sluice's share of that multiplication at ``ratio``.

The decisions here are pure: the request path owns the clock, the sleep and the call.
"""

from __future__ import annotations

import random
from typing import Final

from proxy.config import Retry

#: The least time a retried call needs to be worth making: Bedrock's time to a first answer.
MIN_CALL_S: Final = 1.0
# Caps 2**n well before float overflow; max_backoff_ms is reached long before this anyway.
_MAX_DOUBLINGS: Final = 32
# Token-bucket arithmetic in integer micro-tokens, so that ten deposits of 0.1 make exactly
# one retry (in floats they make 0.9999999999999999 and the retry is lost).
_MICRO: Final = 1_000_000

# Bedrock errors that mean "no capacity right now, the call did nothing": retrying later
# can succeed and costs no tokens. Deliberately absent:
# - InternalServerException (500): may follow model work already billed, can be caused by
#   the input itself, and every AWS SDK already retries it, so a Sluice retry only
#   multiplies attempts;
# - ModelTimeoutException (408): the retry would take as long again, past the deadline;
# - every other 4xx: the same request fails the same way.
_RETRYABLE: Final = frozenset(
    {
        (429, "ThrottlingException"),
        (429, "ModelNotReadyException"),
        (503, "ServiceUnavailableException"),
    }
)
# A load balancer or proxy in between may answer 429/503 without Bedrock's error header.
_RETRYABLE_UNTYPED: Final = frozenset({429, 503})


class RetryBudget:
    """At most `ratio` extra upstream calls per first attempt, over a sliding horizon (token
    bucket: each first attempt deposits `ratio` tokens up to a cap, each retry spends 1).

    Over any run of calls, retries <= ratio × first attempts + cap. The bucket starts full so a
    fresh process can absorb a short burst of throttles; ``ratio == 0`` disables retries. One
    budget per upstream model pool: a storm on one model must not spend another's retries.
    """

    __slots__ = ("_cap", "_deposit", "_level")

    def __init__(self, ratio: float, cap: float = 10.0) -> None:
        if ratio < 0.0:
            raise ValueError(f"retry budget ratio must not be negative, got {ratio}")
        if cap < 1.0:
            raise ValueError(f"retry budget cap must allow one retry (>= 1), got {cap}")
        # Rounded down, so the budget never grants more than the ratio promises.
        self._deposit = int(ratio * _MICRO)
        self._cap = int(cap * _MICRO) if self._deposit else 0
        self._level = self._cap

    @property
    def tokens(self) -> float:
        """Retries currently affordable (fractional)."""
        return self._level / _MICRO

    def on_first_attempt(self) -> None:
        """Record a first upstream attempt (not a retry): earns ``ratio`` of a retry."""
        self._level = min(self._cap, self._level + self._deposit)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is empty."""
        if self._level < _MICRO:
            return False
        self._level -= _MICRO
        return True


def retryable(status: int, error_type: str | None) -> bool:
    """Whether an upstream error response may be retried by Sluice.

    Only for a response whose status line has not been relayed: once a stream has started
    (status 200, error inside the event stream) the caller has bytes and nothing is retried.
    """
    if error_type is None:
        return status in _RETRYABLE_UNTYPED
    return (status, error_type) in _RETRYABLE


def backoff_s(attempt: int, base_ms: int, max_ms: int, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): full jitter.

    Uniform in ``[0, min(max_ms, base_ms × 2**(attempt-1))]`` ms, as in the AWS Architecture
    Blog's "Exponential Backoff And Jitter": spreading retries over the whole window is what
    keeps a throttled fleet from retrying in lockstep.
    """
    return rng.uniform(0.0, _window_ms(attempt, base_ms, max_ms)) / 1000.0


def next_delay(
    attempt: int,
    cfg: Retry,
    remaining_s: float | None,
    budget: RetryBudget,
    rng: random.Random,
    *,
    min_call_s: float = MIN_CALL_S,
) -> float | None:
    """Seconds to sleep before retry number ``attempt`` (1-based), or None not to retry.

    None when ``attempt`` is past ``cfg.max_retries``, when the caller's ``remaining_s``
    (None: no deadline known) leaves less than ``min_call_s`` for the call, or when the retry
    budget is empty. The jitter window is shrunk to fit the deadline rather than a drawn delay
    refused, so whether a retry happens does not depend on the dice. The budget is spent only
    when a delay is returned.
    """
    if attempt > cfg.max_retries:
        return None
    window_s = _window_ms(attempt, cfg.base_backoff_ms, cfg.max_backoff_ms) / 1000.0
    if remaining_s is not None:
        slack = remaining_s - min_call_s
        if slack < 0.0:
            return None
        window_s = min(window_s, slack)
    if not budget.try_spend():
        return None
    return rng.uniform(0.0, window_s)


def _window_ms(attempt: int, base_ms: int, max_ms: int) -> float:
    """The full-jitter window for retry ``attempt``: base doubled per retry, capped."""
    if attempt < 1:
        raise ValueError(f"retry attempts count from 1, got {attempt}")
    return min(float(max_ms), base_ms * 2.0 ** min(attempt - 1, _MAX_DOUBLINGS))
