"""The simulator's configuration: pydantic models, defaults, YAML loading and runtime patches.

Models are keyed by foundation-model id. Entries in a YAML file (or a runtime patch) are
*merged* onto the built-in model of the same id, so a file that only says
``anthropic.claude-3-sonnet-20240229-v1:0: {quotas: {concurrency: 40}}`` keeps every other model
and every other Sonnet default. ``include_default_models: false`` starts from an empty table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "DEFAULT_MODELS",
    "AuthConfig",
    "FaultConfig",
    "LatencyConfig",
    "ModelConfig",
    "QuotaConfig",
    "SimulatorConfig",
    "SimulatorConfigError",
    "TierConfig",
    "describe_validation_error",
    "load_simulator_config",
    "merge_patch",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatencyConfig(_Strict):
    """Time to first token grows linearly with input size; output streams at a constant rate."""

    ttft_s: Annotated[float, Field(ge=0)] = 0.8
    ttft_per_1k_input_s: Annotated[float, Field(ge=0)] = 0.5
    output_tokens_per_s: Annotated[float, Field(gt=0)] = 60.0
    #: Overrides the global ``latency_scale`` for this model when set.
    latency_scale: Annotated[float | None, Field(ge=0)] = None


class QuotaConfig(_Strict):
    """Per-model quotas; ``None`` means unlimited. Token buckets refill continuously."""

    concurrency: Annotated[int | None, Field(ge=0)] = None
    requests_per_minute: Annotated[int | None, Field(ge=0)] = None
    tokens_per_minute: Annotated[int | None, Field(ge=0)] = None
    #: Seconds of refill the per-minute buckets hold (Bedrock: 60; shorter for short runs).
    burst_seconds: Annotated[float, Field(gt=0, le=60)] = 60.0


class FaultConfig(_Strict):
    """Injected failures. Rates are probabilities per request, drawn from the seeded RNG."""

    throttle_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    unavailable_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    timeout_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    #: When set, streams on this model send this many events, then an exception frame.
    stream_error_after: Annotated[int | None, Field(ge=0)] = None
    #: Probability that a stream is cut when ``stream_error_after`` is set.
    stream_error_rate: Annotated[float, Field(ge=0, le=1)] = 1.0
    stream_error_type: Literal["modelStreamErrorException", "throttlingException"] = (
        "modelStreamErrorException"
    )


TierName = Literal["priority", "default", "flex", "reserved"]


class TierConfig(_Strict):
    """One Bedrock service tier: how fast it answers and how much of a model's quota it may use."""

    #: Multiplies the model's delays (time to first token and per output token).
    latency_factor: Annotated[float, Field(gt=0)] = 1.0
    #: Fraction of each model quota (concurrency, requests/min, tokens/min) calls on this tier
    #: may fill; the rest is kept for tiers with a larger share, so lower tiers throttle first.
    quota_share: Annotated[float, Field(gt=0, le=1)] = 1.0


#: Built-in tiers (bedrock-wire.md §7): priority up to 25% faster, flex slower and throttled
#: first. ``default`` (also calls naming no tier) keeps the whole quota, so models behave as
#: before tiers existed; give it a share below 1 to keep headroom for priority.
#: Reserved capacity is not modelled separately: it uses the model's quotas in full.
DEFAULT_TIERS: Mapping[TierName, Mapping[str, float]] = {
    "priority": {"latency_factor": 0.75, "quota_share": 1.0},
    "default": {"latency_factor": 1.0, "quota_share": 1.0},
    "flex": {"latency_factor": 1.5, "quota_share": 0.5},
    "reserved": {"latency_factor": 1.0, "quota_share": 1.0},
}


class ModelConfig(_Strict):
    """One simulated model. Every id form (profile prefixes, ARNs) resolves to it."""

    #: The model name Anthropic's API reports in ``message.model``.
    name: str = "claude-simulated"
    max_output_tokens: Annotated[int, Field(ge=1)] = 4096
    #: Output tokens are charged this many times against tokens/min ("burndown").
    output_token_weight: Annotated[int, Field(ge=1)] = 1
    #: Extra exact ids that resolve to this model (e.g. application-inference-profile ARNs).
    aliases: tuple[str, ...] = ()
    latency: LatencyConfig = LatencyConfig()
    quotas: QuotaConfig = QuotaConfig()
    faults: FaultConfig = FaultConfig()
    #: Service tiers this model offers (None: all); others are a ValidationException.
    service_tiers: tuple[TierName, ...] | None = None


class AuthConfig(_Strict):
    """Accepted credentials; authentication is off when nothing is set."""

    access_key_id: str | None = None
    secret_access_key: str | None = None
    bearer_token: str | None = None

    @model_validator(mode="after")
    def _key_pair(self) -> AuthConfig:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key must be set together")
        return self

    @property
    def enabled(self) -> bool:
        """Whether requests must authenticate at all."""
        return self.access_key_id is not None or self.bearer_token is not None


def _model(
    name: str,
    max_out: int,
    ttft: float,
    per_1k: float,
    tps: float,
    weight: int = 1,
) -> dict[str, Any]:
    return {
        "name": name,
        "max_output_tokens": max_out,
        "output_token_weight": weight,
        "latency": {"ttft_s": ttft, "ttft_per_1k_input_s": per_1k, "output_tokens_per_s": tps},
    }


#: Built-in models (bedrock-wire.md §7). TTFT growth per 1K input tokens is chosen so an 8K-token
#: prompt to Claude 3 Sonnet waits ~10 s for its first token (scenarios.md, incident 6).
DEFAULT_MODELS: Mapping[str, Mapping[str, Any]] = {
    "anthropic.claude-3-sonnet-20240229-v1:0": _model(
        "claude-3-sonnet-20240229", 4096, 0.76, 1.2, 60.0
    ),
    "anthropic.claude-3-5-sonnet-20241022-v2:0": _model(
        "claude-3-5-sonnet-20241022", 8192, 0.95, 1.0, 54.0
    ),
    "anthropic.claude-3-haiku-20240307-v1:0": _model(
        "claude-3-haiku-20240307", 4096, 0.45, 0.3, 120.0
    ),
    "anthropic.claude-3-5-haiku-20241022-v1:0": _model(
        "claude-3-5-haiku-20241022", 8192, 0.8, 0.4, 125.0
    ),
    "anthropic.claude-3-7-sonnet-20250219-v1:0": _model(
        "claude-3-7-sonnet-20250219", 64000, 1.0, 1.0, 55.0, weight=5
    ),
    "anthropic.claude-sonnet-4-20250514-v1:0": _model(
        "claude-sonnet-4-20250514", 64000, 1.2, 1.0, 55.0, weight=5
    ),
}


class SimulatorConfig(_Strict):
    """Everything the simulator does; every field has a default (``SimulatorConfig()`` works)."""

    #: Multiplies every simulated delay: 1.0 realistic, 0 answers at once (benchmark baseline).
    latency_scale: Annotated[float, Field(ge=0)] = 1.0
    #: Reply length when the request does not say (``[[sim:output_tokens=N]]``), capped by
    #: the request's max tokens.
    default_output_tokens: Annotated[int, Field(ge=1)] = 40
    #: Tokens grouped into one streamed delta.
    tokens_per_delta: Annotated[int, Field(ge=1)] = 3
    #: Seed of the RNG that draws rate-based faults.
    seed: int = 0
    #: Request records kept for ``GET /_sim/stats`` (0 keeps none).
    records_kept: Annotated[int, Field(ge=0)] = 1000
    #: Region and account used in ARNs the simulator makes up (async invocations).
    region: str = "us-east-1"
    account_id: str = "123456789012"
    include_default_models: bool = True
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    auth: AuthConfig = AuthConfig()
    #: ApplyGuardrail intervenes when the text contains one of these (case-insensitive).
    guardrail_blocked_words: tuple[str, ...] = ()
    guardrail_blocked_message: str = "Sorry, the model cannot answer this question."
    #: Service tiers by name; a file's entries merge onto :data:`DEFAULT_TIERS`.
    service_tiers: dict[TierName, TierConfig] = Field(
        default_factory=lambda: {k: TierConfig.model_validate(v) for k, v in DEFAULT_TIERS.items()}
    )

    @model_validator(mode="before")
    @classmethod
    def _merge_default_tiers(cls, data: Any) -> Any:
        given = data.get("service_tiers") if isinstance(data, dict) else None
        if not isinstance(given, dict):
            return data
        merged = {k: _merge_tier(v, given.get(k)) for k, v in DEFAULT_TIERS.items()}
        return {**data, "service_tiers": {**given, **merged}}

    @model_validator(mode="before")
    @classmethod
    def _merge_default_models(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("include_default_models", True):
            return data
        given = data.get("models") or {}
        if not isinstance(given, dict):
            return data  # let field validation report the wrong type
        merged: dict[str, Any] = {k: dict(v) for k, v in DEFAULT_MODELS.items()}
        for model_id, spec in given.items():
            base = merged.get(model_id, {})
            merged[model_id] = merge_patch(base, spec) if isinstance(spec, dict) else spec
        return {**data, "models": merged}


def _merge_tier(default: Mapping[str, Any], given: Any) -> Any:
    if given is None:
        return default
    return merge_patch(default, given) if isinstance(given, Mapping) else given


class SimulatorConfigError(ValueError):
    """A configuration file or patch is invalid; the message names the source and field path."""


def merge_patch(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``patch`` onto ``base`` (dicts merge; anything else replaces)."""
    out = dict(base)
    for key, value in patch.items():
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            out[key] = merge_patch(old, value)
        else:
            out[key] = value
    return out


def describe_validation_error(source: str, exc: ValidationError) -> str:
    """One line per problem: ``source: models.<id>.quotas.concurrency: <reason>``."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(part) for part in err["loc"]) or "(top level)"
        lines.append(f"{source}: {path}: {err['msg']}")
    return "\n".join(lines)


def load_simulator_config(path: str | None) -> SimulatorConfig:
    """Read a YAML config file, or return the defaults when ``path`` is None.

    Raises :class:`SimulatorConfigError` naming the file and the field path at fault.
    """
    if path is None:
        return SimulatorConfig()
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SimulatorConfigError(f"{path}: cannot read simulator config: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SimulatorConfigError(f"{path}: (top level): expected a mapping of settings")
    try:
        return SimulatorConfig.model_validate(data)
    except ValidationError as exc:
        raise SimulatorConfigError(describe_validation_error(path, exc)) from exc
