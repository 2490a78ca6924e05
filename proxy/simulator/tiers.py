"""Bedrock service tiers: reading the tier a call asks for, and what the tier changes.

InvokeModel and its stream name the tier in ``X-Amzn-Bedrock-Service-Tier``; Converse and
ConverseStream in ``serviceTier: {"type": ...}``. A call without one runs on ``default``.
Each tier scales the model's latency and may fill only its share of the model's quotas
(:class:`proxy.simulator.config.TierConfig`), so flex is throttled before default, and
default before priority, exactly when the model is busy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.errors import BedrockError
from proxy.simulator.config import SimulatorConfig, TierConfig
from proxy.simulator.models import TOO_MANY_REQUESTS, TOO_MANY_TOKENS, ModelRuntime, TokenBucket

__all__ = ["TIERS", "TIER_HEADER", "requested_tier", "tier_config", "tier_refusal"]

TIER_HEADER = "X-Amzn-Bedrock-Service-Tier"
TIERS = ("priority", "default", "flex", "reserved")
_ENUM = "[" + ", ".join(TIERS) + "]"


def _enum_error(value: Any, where: str) -> BedrockError:
    return BedrockError(
        "ValidationException",
        f"1 validation error detected: Value '{value}' at '{where}' failed to satisfy "
        f"constraint: Member must satisfy enum value set: {_ENUM}",
    )


def requested_tier(headers: Mapping[str, str], doc: Any) -> str | None:
    """The tier a call names (``doc``: a Converse body, None for InvokeModel); None if none."""
    if doc is None:
        value = headers.get(TIER_HEADER)
        if value is not None and value not in TIERS:
            raise _enum_error(value, "serviceTier")
        return value
    field = doc.get("serviceTier") if isinstance(doc, dict) else None
    if field is None:
        return None
    if not isinstance(field, dict):
        raise BedrockError(
            "ValidationException",
            "1 validation error detected: Value at 'serviceTier' failed to satisfy constraint: "
            "Member must be a structure",
        )
    value = field.get("type")
    if value not in TIERS:
        raise _enum_error(value, "serviceTier.type")
    return str(value)


def tier_config(config: SimulatorConfig, runtime: ModelRuntime, tier: str | None) -> TierConfig:
    """The settings of the tier a call runs on; a tier the model does not offer is a 400."""
    name = tier or "default"
    offered = runtime.config.service_tiers
    if offered is not None and name not in offered:
        raise BedrockError(
            "ValidationException",
            f"The model {runtime.model_id} does not support the '{name}' service tier "
            f"(supported: {', '.join(offered)}).",
        )
    return config.service_tiers.get(name) or TierConfig()  # type: ignore[call-overload]


def _short(bucket: TokenBucket | None, amount: float, share: float, now: float) -> bool:
    return bucket is not None and not bucket.available(amount + (1 - share) * bucket.capacity, now)


def tier_refusal(
    runtime: ModelRuntime, tier: TierConfig, input_tokens: int, max_tokens: int, now: float
) -> str | None:
    """The throttling message when the call's tier has used up its share, else None.

    Checked before the model's own admission, which still enforces the full quotas.
    """
    share = tier.quota_share
    if share >= 1:
        return None
    concurrency = runtime.config.quotas.concurrency
    if concurrency is not None and runtime.stats.in_flight + 1 > share * concurrency:
        return TOO_MANY_REQUESTS
    if _short(runtime.rpm, 1, share, now):
        return TOO_MANY_REQUESTS
    if _short(runtime.tpm, runtime.reservation(input_tokens, max_tokens), share, now):
        return TOO_MANY_TOKENS
    return None
