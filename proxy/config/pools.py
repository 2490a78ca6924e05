"""Model pools: the account quota Bedrock grants per model, its tiers, prices and control."""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import Field, field_validator, model_validator

from proxy.config.fields import (
    Name,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Strict,
    TierName,
)

#: The rates and bursts a token bucket's arithmetic holds (TATs are ms since the epoch in
#: doubles, levels cross from Lua as integer milli-units). Slower than one a day, a bucket
#: refills past every retry hint (1e-300/min once locked a pool for good); a burst (by
#: default the per-minute value) past 1e12 overflows the milli-units. Above ~1e6 requests or
#: ~1e9 tokens a minute a call's cost moves a TAT by a few of a double's steps at today's
#: epoch (~0.00024 ms) and is undercounted: such a limit never binds, which is what those
#: values are written for ("no limit here"), so they are accepted (refusing them would stop
#: instances whose stored policy has them). Bedrock's quotas are orders of magnitude inside.
MIN_PER_MINUTE: Final = 1 / 1440
MAX_REQUESTS_PER_MINUTE: Final = 1e12
MAX_TOKENS_PER_MINUTE: Final = 1e12
MIN_BURST: Final = 1.0
MAX_BURST: Final = 1e12


def _within(value: float | None, low: float, high: float, what: str) -> float | None:
    # Also refuses NaN and infinities: no comparison holds for NaN.
    if value is not None and not low <= value <= high:
        raise ValueError(f"must be from {low:.6g} ({what}) to {high:g}, got {value:g}")
    return value


class Limits(Strict):
    """Rate and concurrency limits for one scope (a model pool, or a workload on a model)."""

    requests_per_minute: PositiveFloat | None = None
    tokens_per_minute: PositiveFloat | None = None
    concurrency: PositiveInt | None = None
    #: Bucket capacities; default to 10 seconds of refill (at least one request / one max call).
    burst_requests: PositiveFloat | None = None
    burst_tokens: PositiveFloat | None = None

    @field_validator("requests_per_minute")
    @classmethod
    def _requests_rate(cls, v: float | None) -> float | None:
        return _within(v, MIN_PER_MINUTE, MAX_REQUESTS_PER_MINUTE, "one a day")

    @field_validator("tokens_per_minute")
    @classmethod
    def _tokens_rate(cls, v: float | None) -> float | None:
        return _within(v, MIN_PER_MINUTE, MAX_TOKENS_PER_MINUTE, "one a day")

    @field_validator("burst_requests", "burst_tokens")
    @classmethod
    def _burst(cls, v: float | None) -> float | None:
        return _within(v, MIN_BURST, MAX_BURST, "one request or token")


class Adaptive(Strict):
    """Fleet-wide adaptive concurrency for a pool (AIMD on Bedrock's throttles and latency)."""

    floor: PositiveInt = 1
    #: Never above this (and never above the pool's configured concurrency).
    ceiling: PositiveInt
    #: Where the limit starts; defaults to the pool's configured concurrency.
    initial: PositiveInt | None = None
    target_p99_ms: PositiveFloat = 1200.0
    interval_seconds: PositiveFloat = 5.0
    #: Multiplicative decrease on throttles (new = old x decrease).
    decrease: Annotated[float, Field(gt=0, lt=1)] = 0.8
    #: Additive increase per interval while healthy.
    increase: PositiveInt = 2


class Breaker(Strict):
    """Per-model circuit breaker on Bedrock's throttles and 5xx."""

    #: Open when throttled-or-5xx / requests over the window reaches this.
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.1
    window_seconds: PositiveFloat = 30.0
    min_requests: PositiveInt = 20
    #: How long it stays open before letting probes through (half-open).
    open_seconds: PositiveFloat = 10.0
    half_open_probes: PositiveInt = 3


class TierPrice(Strict):
    """What Bedrock charges on one service tier, in USD per million tokens."""

    input_per_million: NonNegativeFloat
    output_per_million: NonNegativeFloat


class ModelPool(Limits):
    """A model pool: the account quota Bedrock grants for one model, shared by every workload."""

    #: Foundation-model ids (inference-profile ids like ``us.<id>`` and ARNs naming them
    #: match automatically) and any opaque ids/ARNs, e.g. application inference profiles.
    ids: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    #: Bedrock's output-token burndown: 5 for Claude 3.7 / 4-series, 1 for others.
    output_token_weight: PositiveFloat = 1.0
    #: Reserved for output when a request sets no max_tokens (Bedrock reserves the model max).
    default_max_tokens: PositiveInt = 4096
    #: The model's real output ceiling: a request's max_tokens (or default_max_tokens) is
    #: reserved up to this at most (Bedrock refuses more itself), so no single call can
    #: drain the pool's tokens.
    max_output_tokens: PositiveInt | None = None
    #: The pool a degraded request may be sent to instead (load shedding).
    downgrade_to: Name | None = None
    adaptive: Adaptive | None = None
    breaker: Breaker | None = None
    #: Service tiers the pool's models offer (None: all); others fall back to ``default``.
    service_tiers: list[TierName] | None = None
    #: Per priority class, the tier on this pool (overrides the class's own ``tier``).
    class_tiers: dict[Name, TierName] = {}
    #: Tiers Bedrock gives their own quota: calls on them are admitted against these limits
    #: instead of the pool's (which are ``default``'s, and any unlisted tier's).
    tiers: dict[Literal["priority", "flex", "reserved"], Limits] = {}
    #: USD per million input/output tokens on each tier; settled usage is counted as cost.
    prices: dict[TierName, TierPrice] = {}

    @model_validator(mode="after")
    def _tiers_offered(self) -> ModelPool:
        offered = self.service_tiers
        lacking = [t for t in (*self.tiers, *self.prices) if offered and t not in offered]
        if lacking:
            names = ", ".join(sorted(set(lacking)))
            raise ValueError(
                f"tiers/prices name tiers the pool does not offer: {names}"
                f" (service_tiers: {', '.join(offered or ())})"
            )
        return self

    @model_validator(mode="after")
    def _burst_holds_one_call(self) -> ModelPool:
        largest = (self.max_output_tokens or 0) * self.output_token_weight
        if self.burst_tokens is not None and self.burst_tokens < largest:
            raise ValueError(
                f"burst_tokens ({self.burst_tokens:g}) cannot hold one call at "
                f"max_output_tokens ({self.max_output_tokens}) x output_token_weight "
                f"({self.output_token_weight:g}) = {largest:g}; such calls would always be refused"
            )
        return self
