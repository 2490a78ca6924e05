"""What one request may reserve, and the refusal of a reservation that could never fit.

A token bucket admits a call bigger than a class's allowance only when it is full,
and the call leaves the bucket in debt. Unchecked, one ``maxTokens = 2**62`` put a
pool into centuries of debt: every caller, P0 included, was refused until restart.
So a request's output cap is reserved at most up to the model's real maximum
(``models.<pool>.max_output_tokens``), a reservation larger than a bucket can ever
hold is a 400 naming the limit and the field, and no retry hint is longer than the
binding limit needs to refill from empty.
"""

from __future__ import annotations

from proxy.admission.estimate import RequestEstimate, reservation
from proxy.admission.model import EPS, AdmitPlan, Bucket
from proxy.errors import BedrockError
from proxy.policy import PoolInfo


def reserved_tokens(pool: PoolInfo, input_tokens: int, est: RequestEstimate) -> int:
    """Input plus the output cap (capped at the pool's ``max_output_tokens``) at its weight."""
    output = est.max_tokens or pool.default_max_tokens
    if pool.max_output_tokens is not None and output > pool.max_output_tokens:
        output = pool.max_output_tokens
    return reservation(input_tokens, output, pool.output_weight)


def _buckets(plan: AdmitPlan) -> tuple[tuple[str, Bucket | None], ...]:
    return (
        ("pool.tokens_per_minute", plan.pool_tokens),
        ("workload.tokens_per_minute", plan.workload_tokens),
    )


def misfit(plan: AdmitPlan, tokens: int) -> tuple[str, float] | None:
    """The first token limit ``tokens`` can never fit (its name and capacity), or None."""
    for name, bucket in _buckets(plan):
        if bucket is not None and tokens > bucket.burst + EPS:
            return name, bucket.burst
    return None


def reserve(plan: AdmitPlan, pool: PoolInfo, input_tokens: int, est: RequestEstimate) -> int:
    """Tokens to reserve for this request, or a 400 when no amount of waiting would admit it."""
    tokens = reserved_tokens(pool, input_tokens, est)
    found = misfit(plan, tokens)
    if found is None:
        return tokens
    name, capacity = found
    field = est.max_tokens_field or f"models.{pool.name}.default_max_tokens"
    where = f"model pool '{pool.name}'"
    if name.startswith("workload"):
        where = f"workload '{plan.workload}' on {where}"
    raise BedrockError(
        "ValidationException",
        f"this request reserves {tokens} tokens (about {input_tokens} input + {field} "
        f"x output weight {pool.output_weight:g}), more than the {name} limit of {where} "
        f"can ever hold ({int(capacity)} tokens); lower {field}",
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
