"""What one request may reserve, and the refusal of a reservation that could never fit.

A token bucket admits a call bigger than a class's allowance only when it is full,
and the call leaves the bucket in debt. Unchecked, one ``maxTokens = 2**62`` put a
pool into centuries of debt: every caller, P0 included, was refused until restart; and
one batch call whose reservation was above its class's share of the bucket took, on a
full bucket, the headroom kept for higher classes. So a request's output cap is reserved
at most up to the model's real maximum (``models.<pool>.max_output_tokens``), a
reservation is never larger than its class's allowance of a bucket (its share of the
pool's, all of its workload's: so no reservation leaves debt or takes a higher class's
headroom; real usage above it settles when the call ends), an output cap that no bucket
could ever hold is a 400 naming the limit and the field, and no retry hint is longer than
the binding limit needs to refill from empty.
"""

from __future__ import annotations

import math
from typing import NoReturn

from proxy.admission.estimate import RequestEstimate, reservation
from proxy.admission.model import EPS, AdmitPlan, Bucket
from proxy.errors import BedrockError
from proxy.policy import PoolInfo


def _buckets(plan: AdmitPlan) -> tuple[tuple[str, Bucket | None, float], ...]:
    """The token buckets of ``plan``, each with the share of it the caller's class may use
    (a priority class's share applies to the pool's limits, not to its workload's own)."""
    return (
        ("pool.tokens_per_minute", plan.pool_tokens, plan.share),
        ("workload.tokens_per_minute", plan.workload_tokens, 1.0),
    )


def reserve(plan: AdmitPlan, pool: PoolInfo, input_tokens: int, est: RequestEstimate) -> int:
    """Tokens to reserve: input plus the output cap (at most the pool's ``max_output_tokens``)
    at its weight, clipped to the class's allowance of each token bucket that applies.

    A clipped reservation is admitted on a full bucket and settled to real usage (a long
    input is real work Bedrock bounds by its context window); an output cap the request
    set that no bucket could ever hold is a 400 naming the limit and the field to lower.
    """
    output = est.max_tokens or pool.default_max_tokens
    if pool.max_output_tokens is not None and output > pool.max_output_tokens:
        output = pool.max_output_tokens
    weighted = reservation(0, output, pool.output_weight)
    tokens = input_tokens + weighted
    for name, bucket, share in _buckets(plan):
        # A class reserves at most its own allowance of a bucket: a reservation above it
        # would pass on a full bucket and take the headroom kept for higher classes (one
        # batch call with a large maxTokens left P0 refused for minutes).
        most = bucket.burst * share if bucket is not None else 0.0
        if bucket is None or tokens <= most + EPS:
            continue
        field = est.max_tokens_field
        if field is not None and weighted > bucket.burst + EPS:
            what = f"{field} x output weight {pool.output_weight:g} is {weighted} tokens"
            _refuse(plan, pool, name, bucket, what, field)
        tokens = max(1, math.floor(most))
    return tokens


def _refuse(
    plan: AdmitPlan, pool: PoolInfo, limit: str, bucket: Bucket, what: str, field: str
) -> NoReturn:
    where = f"model pool '{pool.name}'"
    if limit.startswith("workload"):
        where = f"workload '{plan.workload}' on {where}"
    raise BedrockError(
        "ValidationException",
        f"this request can never be admitted: {what}, more than the {limit} limit of "
        f"{where} can ever hold ({math.floor(bucket.burst)} tokens); lower {field}",
    )


def refill_ms(plan: AdmitPlan, limit: str | None) -> float | None:
    """Milliseconds the bucket behind ``limit`` needs to refill from empty (None: no bucket)."""
    if limit is None:
        return None
    scope, _, kind = limit.partition(".")
    if kind == "requests_per_minute":
        bucket = plan.workload_requests if scope == "workload" else plan.pool_requests
    elif kind == "tokens_per_minute":
        bucket = plan.workload_tokens if scope == "workload" else plan.pool_tokens
    else:
        return None
    return None if bucket is None else bucket.burst / bucket.rate_per_s * 1000.0
