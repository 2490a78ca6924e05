"""Per-model runtime state: the latency model, Bedrock-style quotas and counters.

Quota arithmetic is pure (time is passed in), so it can be property-tested; the caller reads
the clock once per decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from proxy.simulator.config import ModelConfig

__all__ = ["Admission", "ModelRuntime", "ModelStats", "TokenBucket"]

TOO_MANY_REQUESTS = "Too many requests, please wait before trying again."
TOO_MANY_TOKENS = "Too many tokens, please wait before trying again."


class TokenBucket:
    """A bucket of ``capacity`` that refills at ``capacity`` per minute, continuously.

    Takes are all-or-nothing; refunds never overfill. Time is a monotonic clock in seconds.
    ``burst_s`` shrinks the bucket to that many seconds of refill (Bedrock's is a minute;
    a shorter one makes a per-minute quota bind within a short benchmark run).
    """

    __slots__ = ("burst_s", "capacity", "level", "rate", "updated")

    def __init__(self, capacity: int, now: float, burst_s: float = 60.0) -> None:
        self.burst_s = burst_s
        self.capacity = capacity * burst_s / 60.0
        self.rate = capacity / 60.0
        self.level = self.capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def available(self, amount: float, now: float) -> bool:
        """Whether ``amount`` could be taken now (refills first)."""
        self._refill(now)
        return self.level >= amount

    def take(self, amount: float, now: float) -> None:
        """Remove ``amount``; callers check :meth:`available` first."""
        self._refill(now)
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        """Return ``amount`` (a reservation not used), capped at capacity."""
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def resize(self, capacity: int, now: float) -> None:
        """Change the quota, keeping what is left (capped at the new capacity)."""
        self._refill(now)
        self.capacity = capacity * self.burst_s / 60.0
        self.rate = capacity / 60.0
        self.level = min(self.level, self.capacity)


@dataclass(slots=True)
class ModelStats:
    """Counters reported by ``GET /_sim/stats``."""

    requests: int = 0
    admitted: int = 0
    throttled: int = 0
    errors: int = 0
    in_flight: int = 0
    peak_concurrency: int = 0
    cancelled: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def reset(self) -> None:
        """Zero every counter except the requests still in flight."""
        in_flight = self.in_flight
        for spec in fields(self):
            setattr(self, spec.name, 0)
        self.in_flight = self.peak_concurrency = in_flight


@dataclass(frozen=True, slots=True)
class Admission:
    """A granted call: what it reserved against tokens/min, to settle when it ends."""

    reserved_tokens: int


@dataclass(slots=True)
class ModelRuntime:
    """One model's live state. ``config`` is swapped (not mutated) on runtime updates."""

    model_id: str
    config: ModelConfig
    latency_scale: float
    stats: ModelStats = field(default_factory=ModelStats)
    rpm: TokenBucket | None = None
    tpm: TokenBucket | None = None

    def configure(self, config: ModelConfig, global_scale: float, now: float) -> None:
        """Apply a (new) configuration, keeping counters and what is left in the buckets."""
        self.config = config
        scale = config.latency.latency_scale
        self.latency_scale = global_scale if scale is None else scale
        burst = config.quotas.burst_seconds
        self.rpm = _rebucket(self.rpm, config.quotas.requests_per_minute, now, burst)
        self.tpm = _rebucket(self.tpm, config.quotas.tokens_per_minute, now, burst)

    def refill(self, now: float) -> None:
        """Fill the buckets to capacity (``POST /_sim/reset``)."""
        for bucket in (self.rpm, self.tpm):
            if bucket is not None:
                bucket.level, bucket.updated = bucket.capacity, now

    # -- latency ------------------------------------------------------------------------------

    def first_token_delay(self, input_tokens: int) -> float:
        """Seconds until the first token, scaled."""
        lat = self.config.latency
        return (lat.ttft_s + lat.ttft_per_1k_input_s * input_tokens / 1000.0) * self.latency_scale

    def output_delay(self, output_tokens: int) -> float:
        """Seconds to generate ``output_tokens`` after the first, scaled."""
        return output_tokens / self.config.latency.output_tokens_per_s * self.latency_scale

    # -- quotas -------------------------------------------------------------------------------

    def reservation(self, input_tokens: int, max_tokens: int) -> int:
        """Tokens/min Bedrock holds at admission: input + max_tokens x burndown weight."""
        return input_tokens + max_tokens * self.config.output_token_weight

    def admit(self, input_tokens: int, max_tokens: int, now: float) -> Admission | str:
        """Admit a call (counting it in flight) or return the throttling message.

        All-or-nothing: a refused call takes nothing from any bucket.
        """
        quotas = self.config.quotas
        stats = self.stats
        if quotas.concurrency is not None and stats.in_flight >= quotas.concurrency:
            return TOO_MANY_REQUESTS
        rpm, tpm = self.rpm, self.tpm
        if rpm is not None and not rpm.available(1, now):
            return TOO_MANY_REQUESTS
        reserve = self.reservation(input_tokens, max_tokens)
        if tpm is not None:
            if not tpm.available(reserve, now):
                return TOO_MANY_TOKENS
            tpm.take(reserve, now)
        if rpm is not None:
            rpm.take(1, now)
        stats.admitted += 1
        stats.in_flight += 1
        if stats.in_flight > stats.peak_concurrency:
            stats.peak_concurrency = stats.in_flight
        return Admission(reserve)

    def settle(
        self, admission: Admission, input_tokens: int, output_tokens: int, now: float
    ) -> None:
        """End an admitted call: leave the slot, refund reserved minus actually used tokens."""
        self.stats.in_flight -= 1
        self.stats.input_tokens += input_tokens
        self.stats.output_tokens += output_tokens
        if self.tpm is not None:
            used = input_tokens + output_tokens * self.config.output_token_weight
            refund = admission.reserved_tokens - used
            if refund > 0:
                self.tpm.give(refund, now)
            elif refund < 0:
                self.tpm.take(-refund, now)


def _rebucket(
    bucket: TokenBucket | None, capacity: int | None, now: float, burst_s: float
) -> TokenBucket | None:
    if capacity is None:
        return None
    if bucket is None or bucket.burst_s != burst_s:
        return TokenBucket(capacity, now, burst_s)
    bucket.resize(capacity, now)
    return bucket
