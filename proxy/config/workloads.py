"""Callers: priority classes, workloads and what each may ask (keys, degrade chain, cache,
budgets, schedules, pauses, batch rules), and how callers are identified."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from proxy.config.fields import (
    Name,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Share,
    Strict,
    TierName,
)
from proxy.config.pools import Limits


class PriorityClass(Strict):
    """How much of each model pool a class may fill; the rest is headroom for higher classes."""

    share: Share = 1.0
    #: When the store (Redis) is unreachable: admit unchecked ("open") or refuse ("closed").
    on_store_failure: Literal["open", "closed"] = "closed"
    #: The latency this class is promised; batch pauses key off it (incident 4).
    target_p99_ms: PositiveFloat | None = None
    #: The Bedrock service tier its calls run on (None: whatever the caller asks, else default).
    tier: TierName | None = None
    #: When Bedrock throttles a call on ``tier``, retry it once on this tier (deadline allowing).
    tier_on_throttle: TierName | None = None
    #: A caller's own tier: ``keep`` it, ``override`` it with ``tier``, or honour it only
    #: when it is not above ``tier`` (``lower_only``: nobody buys priority with a header).
    caller_tier: Literal["keep", "override", "lower_only"] = "lower_only"


class ScheduleWindow(Strict):
    """A daily window (local time) with its own concurrency cap for a workload."""

    start: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]
    end: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-4]):[0-5][0-9]$")]
    concurrency: NonNegativeInt


class Schedule(Strict):
    """Time-of-day concurrency for a workload (e.g. batch: zero at the JST lunch peak)."""

    timezone: str = "UTC"
    windows: list[ScheduleWindow] = Field(min_length=1)


class PauseRule(Strict):
    """Pause a workload while a real-time class's p99 is above ``factor`` x its target."""

    when_class: Name
    factor: PositiveFloat = 2.0


class Template(Strict):
    """A static answer, returned in the caller's response shape and clearly marked."""

    text: str = Field(min_length=1)


class CacheRule(Strict):
    """Opt-in exact-match response cache for a workload."""

    ttl_seconds: PositiveFloat = 300.0


class InputBudget(Strict):
    """An input-token budget enforced before the call (incident 6)."""

    max_input_tokens: PositiveInt
    #: "refuse" with a precise error, or "trim" the middle of the conversation.
    on_exceed: Literal["refuse", "trim"] = "refuse"


class SecretRef(Strict):
    """Where a secret lives: an environment variable or a file, never the policy itself."""

    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' or 'file'")
        return self


class AccessKey(Strict):
    """A SigV4 key pair issued to a workload; clients use it as their AWS credentials."""

    access_key_id: Annotated[str, Field(pattern=r"^[A-Z0-9]{4,128}$")]
    secret: SecretRef


class BatchRule(Strict):
    """How a workload's durable batch records are queued and retried (``proxy/jobs``)."""

    #: Submits that would queue more records than this are refused with 429 + Retry-After.
    max_queued_records: PositiveInt = 100_000
    #: Attempts per record (counted by Sluice in the record) before retryable errors dead-letter.
    max_attempts: PositiveInt = 10
    base_backoff_ms: PositiveInt = 200
    max_backoff_ms: PositiveInt = 20_000


class Workload(Strict):
    """A caller of Bedrock: its class, its keys, and its per-model caps."""

    priority: Name = "default"
    access_keys: list[AccessKey] = []
    api_keys: list[SecretRef] = []
    #: Per model pool; the key "*" applies to every pool without its own entry.
    limits: dict[str, Limits] = {}
    #: If set, the only pools this workload may call.
    models: list[Name] | None = None
    #: What to try, in order, when the requested pool refuses: pool names (a downgrade,
    #: e.g. ``haiku``), ``cached`` (the response cache) and ``template``.
    degrade: list[str] = []
    template: Template | None = None
    cache: CacheRule | None = None
    input_budget: InputBudget | None = None
    #: How long this workload's callers wait for an answer (boto3's read timeout is 60 s;
    #: behind API Gateway it is 29 s). Sluice never retries past it.
    deadline_seconds: PositiveFloat = 60.0
    #: Wait up to this long for capacity instead of being refused at once.
    max_wait_ms: NonNegativeInt = 0
    schedule: Schedule | None = None
    pause: PauseRule | None = None
    #: The service tier for this workload's calls (overrides its class's and pool's).
    tier: TierName | None = None
    batch: BatchRule = Field(default_factory=lambda: BatchRule())


class Identity(Strict):
    """How callers are identified."""

    #: Trust ``x-sluice-workload`` (and ``x-sluice-priority``, which may only lower the class).
    header_mode: bool = False
    #: Workload for callers that present no key Sluice knows; unset means they are refused.
    default_workload: Name | None = None
