"""The policy model: what a policy file may say, and the messages when it says it wrong.

A policy is YAML validated by pydantic with unknown keys forbidden, so a typo is an
error that names the file and the field path instead of a limit silently missing.
Secrets never live in the YAML: a workload names the environment variable or file
that holds them, and they are resolved when the policy is compiled (``policy.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
Share = Annotated[float, Field(gt=0, le=1)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
#: Bedrock's service tiers (X-Amzn-Bedrock-Service-Tier / Converse ``serviceTier.type``).
TierName = Literal["priority", "default", "flex", "reserved"]

#: Where the packaged default policy lives (used when no --config is given).
DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "policies" / "default.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    """Rate and concurrency limits for one scope (a model pool, or a workload on a model)."""

    requests_per_minute: PositiveFloat | None = None
    tokens_per_minute: PositiveFloat | None = None
    concurrency: PositiveInt | None = None
    #: Bucket capacities; default to 10 seconds of refill (at least one request / one max call).
    burst_requests: PositiveFloat | None = None
    burst_tokens: PositiveFloat | None = None


class Adaptive(_Strict):
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


class Breaker(_Strict):
    """Per-model circuit breaker on Bedrock's throttles and 5xx."""

    #: Open when throttled-or-5xx / requests over the window reaches this.
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.1
    window_seconds: PositiveFloat = 30.0
    min_requests: PositiveInt = 20
    #: How long it stays open before letting probes through (half-open).
    open_seconds: PositiveFloat = 10.0
    half_open_probes: PositiveInt = 3


class TierPrice(_Strict):
    """What Bedrock charges on one service tier, in USD per million tokens."""

    input_per_million: Annotated[float, Field(ge=0)]
    output_per_million: Annotated[float, Field(ge=0)]


class ModelPool(Limits):
    """A model pool: the account quota Bedrock grants for one model, shared by every workload."""

    #: Foundation-model ids (inference-profile ids like ``us.<id>`` and ARNs naming them
    #: match automatically) and any opaque ids/ARNs, e.g. application inference profiles.
    ids: list[str] = Field(min_length=1)
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


class PriorityClass(_Strict):
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


class ScheduleWindow(_Strict):
    """A daily window (local time) with its own concurrency cap for a workload."""

    start: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]
    end: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-4]):[0-5][0-9]$")]
    concurrency: Annotated[int, Field(ge=0)]


class Schedule(_Strict):
    """Time-of-day concurrency for a workload (e.g. batch: zero at the JST lunch peak)."""

    timezone: str = "UTC"
    windows: list[ScheduleWindow] = Field(min_length=1)


class PauseRule(_Strict):
    """Pause a workload while a real-time class's p99 is above ``factor`` x its target."""

    when_class: Name
    factor: PositiveFloat = 2.0


class Template(_Strict):
    """A static answer, returned in the caller's response shape and clearly marked."""

    text: str = Field(min_length=1)


class CacheRule(_Strict):
    """Opt-in exact-match response cache for a workload."""

    ttl_seconds: PositiveFloat = 300.0


class InputBudget(_Strict):
    """An input-token budget enforced before the call (incident 6)."""

    max_input_tokens: PositiveInt
    #: "refuse" with a precise error, or "trim" the middle of the conversation.
    on_exceed: Literal["refuse", "trim"] = "refuse"


class SecretRef(_Strict):
    """Where a secret lives: an environment variable or a file, never the policy itself."""

    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' or 'file'")
        return self


class AccessKey(_Strict):
    """A SigV4 key pair issued to a workload; clients use it as their AWS credentials."""

    access_key_id: Annotated[str, Field(pattern=r"^[A-Z0-9]{4,128}$")]
    secret: SecretRef


class BatchRule(_Strict):
    """How a workload's durable batch records are queued and retried (``proxy/jobs``)."""

    #: Submits that would queue more records than this are refused with 429 + Retry-After.
    max_queued_records: PositiveInt = 100_000
    #: Attempts per record (counted by Sluice in the record) before retryable errors dead-letter.
    max_attempts: PositiveInt = 10
    base_backoff_ms: PositiveInt = 200
    max_backoff_ms: PositiveInt = 20_000


class Workload(_Strict):
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
    max_wait_ms: Annotated[int, Field(ge=0)] = 0
    schedule: Schedule | None = None
    pause: PauseRule | None = None
    #: The service tier for this workload's calls (overrides its class's and pool's).
    tier: TierName | None = None
    batch: BatchRule = Field(default_factory=lambda: BatchRule())


class Identity(_Strict):
    """How callers are identified."""

    #: Trust ``x-sluice-workload`` (and ``x-sluice-priority``, which may only lower the class).
    header_mode: bool = False
    #: Workload for callers that present no key Sluice knows; unset means they are refused.
    default_workload: Name | None = None


class UpstreamTimeout(_Strict):
    """Upstream read timeout proportional to input size: base + per 1K tokens, capped."""

    base_seconds: PositiveFloat = 10.0
    per_1k_input_tokens_seconds: Annotated[float, Field(ge=0)] = 1.0
    max_seconds: PositiveFloat = 25.0


class Retry(_Strict):
    """Upstream retries of throttles and 503s inside the caller's deadline."""

    #: Extra attempts per call (0 disables retries).
    max_retries: Annotated[int, Field(ge=0, le=5)] = 2
    #: Retries allowed as a fraction of first attempts (the retry budget).
    budget_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    base_backoff_ms: PositiveInt = 100
    max_backoff_ms: PositiveInt = 2000


class AdaptivityTuning(_Strict):
    """How often the fleet-wide controllers (adaptive limits, breakers, pauses) look."""

    tick_seconds: PositiveFloat = 1.0
    #: The window over which a real-time class's p99 decides batch pauses.
    pause_window_seconds: PositiveFloat = 10.0


class Connections(_Strict):
    """Client-connection protections; defaults follow nginx and Envoy's edge guidance."""

    #: A request's line and headers must arrive within this (Envoy edge: 10 s).
    header_timeout_seconds: PositiveFloat = 10.0
    #: Longest pause between two reads of a request body (nginx client_body_timeout).
    body_timeout_seconds: PositiveFloat = 60.0
    #: An idle keep-alive connection is closed after this (nginx keepalive_timeout).
    keepalive_timeout_seconds: PositiveFloat = 75.0
    #: Open client connections per instance; more are answered 503 and closed.
    max_connections: PositiveInt = 4096
    #: Requests still sending their body (so not yet identified) at once per instance.
    max_unauthenticated_requests: PositiveInt = 256
    #: Longest request line or header line (nginx large_client_header_buffers: 8 KiB).
    max_header_line_bytes: Annotated[int, Field(ge=256)] = 8190
    #: Most header lines in one request.
    max_headers: PositiveInt = 128


class Jobs(_Strict):
    """Durable batch workers in every instance (``proxy/jobs``)."""

    enabled: bool = True
    #: Records one instance processes at once (admission still decides the pace).
    workers: PositiveInt = 16
    #: A record's visibility lease, renewed while it is processed; a dead worker's records
    #: are taken over this long after its last renewal.
    lease_seconds: PositiveFloat = 30.0
    #: The embedded store's file when Sluice runs without Redis (created on first submit).
    sqlite_path: str = "sluice-jobs.sqlite3"
    #: Largest JSONL body one submit may send (it is held in memory while it is validated).
    max_submit_bytes: PositiveInt = 256 * 1024 * 1024


class Server(_Strict):
    """Process-wide settings that belong with the policy."""

    region: str | None = None
    max_body_bytes: PositiveInt = 20 * 1024 * 1024
    lease_ttl_seconds: PositiveFloat = 30.0
    upstream_connect_timeout_seconds: PositiveFloat = 5.0
    upstream_read_timeout_seconds: PositiveFloat = 300.0
    store_timeout_ms: PositiveInt = 250
    access_log: bool = True
    #: Where models not named in any pool go: "allow" (no pool limits) or "refuse".
    unknown_models: Literal["allow", "refuse"] = "allow"
    upstream_timeout: UpstreamTimeout | None = None
    retry: Retry = Field(default_factory=lambda: Retry())
    adaptivity: AdaptivityTuning = Field(default_factory=lambda: AdaptivityTuning())
    connections: Connections = Field(default_factory=lambda: Connections())
    jobs: Jobs = Field(default_factory=lambda: Jobs())


class Policy(_Strict):
    """A whole policy file."""

    version: Literal[1] = 1
    server: Server = Server()
    identity: Identity = Identity()
    models: dict[Name, ModelPool] = {}
    priorities: dict[Name, PriorityClass] = {"default": PriorityClass()}
    workloads: dict[Name, Workload] = {}

    @model_validator(mode="after")
    def _references_resolve(self) -> Policy:
        problems: list[str] = []
        for name, pool in self.models.items():
            if pool.downgrade_to is not None and pool.downgrade_to not in self.models:
                problems.append(
                    f"models.{name}.downgrade_to: unknown model pool '{pool.downgrade_to}'"
                )
        for name, wl in self.workloads.items():
            if wl.priority not in self.priorities:
                problems.append(
                    f"workloads.{name}.priority: unknown priority class '{wl.priority}' "
                    f"(declared: {', '.join(self.priorities)})"
                )
            for pool_name in wl.limits:
                if pool_name != "*" and pool_name not in self.models:
                    problems.append(
                        f"workloads.{name}.limits.{pool_name}: unknown model pool '{pool_name}'"
                    )
            for step in wl.degrade:
                if step not in ("cached", "template") and step not in self.models:
                    problems.append(
                        f"workloads.{name}.degrade: '{step}' is neither a model pool nor "
                        "'cached' / 'template'"
                    )
            if "template" in wl.degrade and wl.template is None:
                problems.append(
                    f"workloads.{name}.degrade: 'template' needs workloads.{name}.template"
                )
            if "cached" in wl.degrade and wl.cache is None:
                problems.append(f"workloads.{name}.degrade: 'cached' needs workloads.{name}.cache")
            if wl.pause is not None and wl.pause.when_class not in self.priorities:
                problems.append(
                    f"workloads.{name}.pause.when_class: unknown priority class "
                    f"'{wl.pause.when_class}'"
                )
            elif (
                wl.pause is not None and self.priorities[wl.pause.when_class].target_p99_ms is None
            ):
                problems.append(
                    f"workloads.{name}.pause.when_class: class '{wl.pause.when_class}' has no "
                    f"target_p99_ms, so the pause could never trigger"
                )
            if wl.schedule is not None:
                try:
                    ZoneInfo(wl.schedule.timezone)
                except (ZoneInfoNotFoundError, ValueError):
                    problems.append(
                        f"workloads.{name}.schedule.timezone: unknown time zone "
                        f"'{wl.schedule.timezone}'"
                    )
            for pool_name in wl.models or []:
                if pool_name not in self.models:
                    problems.append(f"workloads.{name}.models: unknown model pool '{pool_name}'")
        dw = self.identity.default_workload
        if dw is not None and dw not in self.workloads:
            problems.append(f"identity.default_workload: unknown workload '{dw}'")
        seen: dict[str, str] = {}
        for name, wl in self.workloads.items():
            for key in wl.access_keys:
                if key.access_key_id in seen:
                    problems.append(
                        f"workloads.{name}.access_keys: access key id {key.access_key_id} is "
                        f"already given to workload '{seen[key.access_key_id]}'"
                    )
                seen[key.access_key_id] = name
        owner: dict[str, str] = {}
        for name, pool in self.models.items():
            for model_id in pool.ids:
                if model_id in owner:
                    problems.append(
                        f"models.{name}.ids: '{model_id}' already belongs to pool "
                        f"'{owner[model_id]}'"
                    )
                owner[model_id] = name
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _tiers_resolve(self) -> Policy:
        problems = [
            f"models.{name}.class_tiers.{cls}: unknown priority class '{cls}'"
            for name, pool in self.models.items()
            for cls in pool.class_tiers
            if cls not in self.priorities
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class PolicyError(Exception):
    """A policy file that cannot be used; the message names the file and each field at fault."""


def _format(path: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {loc + ': ' if loc else ''}{msg}")
    return "\n".join(lines)


def parse_policy(data: Any, source: str = "<policy>") -> Policy:
    """Validate an already-parsed document; raise :class:`PolicyError` naming ``source``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: the top level must be a mapping, not {type(data).__name__}")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_format(source, exc)) from None


def load_policy(path: str | Path | None) -> Policy:
    """Read and validate a policy file (the packaged default when ``path`` is None)."""
    file = Path(path) if path is not None else DEFAULT_POLICY
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{file}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{file}: not valid YAML: {exc}") from None
    return parse_policy(data, str(file))
