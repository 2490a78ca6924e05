"""Bedrock service tiers by priority class: which tier a call runs on, and on what it falls back.

Bedrock sells one model at several tiers (``priority`` ahead of ``default`` in its queue,
``flex`` cheaper and throttled first, ``reserved``), chosen per request by the
``X-Amzn-Bedrock-Service-Tier`` header (InvokeModel*) or ``serviceTier.type`` (Converse*).
Sluice knows which calls are P0 and which are batch, so the policy maps classes to tiers:

* the tier is the workload's ``tier``, else the pool's ``class_tiers[class]``, else the
  class's ``tier`` (None: Sluice leaves the request's own choice alone);
* the caller's own tier is kept, overridden or honoured only when not above the policy's
  (``caller_tier``; default ``lower_only``, so nobody buys priority by setting a header);
* a tier the pool does not offer becomes ``default`` (never an error);
* a call Bedrock throttles on its tier may be retried once on ``tier_on_throttle``.

Everything here is pure; the request path sends, reads the answer and retries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
from multidict import CIMultiDict

from proxy.config import Policy

__all__ = [
    "NO_TIER",
    "SERVED_HEADER",
    "TIERED_OPERATIONS",
    "TIER_HEADER",
    "TierChoice",
    "TierTable",
    "apply_tier",
    "caller_tier",
    "escalation",
]

TIER_HEADER: Final = "X-Amzn-Bedrock-Service-Tier"
#: What Sluice tells the caller (and logs, and counts) when a call ran on a tier.
SERVED_HEADER: Final = "x-sluice-service-tier"
#: Cost order: a caller may always move down it under ``lower_only``.
RANK: Final = {"flex": 0, "default": 1, "reserved": 2, "priority": 3}
_CACHE_MAX: Final = 4096
TIERED_OPERATIONS: Final = frozenset(
    {"InvokeModel", "InvokeModelWithResponseStream", "Converse", "ConverseStream"}
)


@dataclass(frozen=True, slots=True)
class TierChoice:
    """The tier to send (None: leave the request as the caller wrote it) and its fallback."""

    tier: str | None
    on_throttle: str | None = None


#: The choice on a pool where nothing names a tier: the request goes as the caller wrote it.
NO_TIER: Final = TierChoice(None)


def caller_tier(operation: str, headers: Mapping[str, str], body: bytes) -> str | None:
    """The tier the caller asked for, if any (cheap when it asked for none)."""
    if not operation.startswith("Converse"):
        return headers.get(TIER_HEADER)
    if b'"serviceTier"' not in body:
        return None
    try:
        field = orjson.loads(body).get("serviceTier")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    value = field.get("type") if isinstance(field, dict) else None
    return value if isinstance(value, str) else None


def _merge(policy_tier: str | None, asked: str | None, mode: str) -> str | None:
    if asked is None or asked not in RANK:
        # No wish, or a tier Bedrock will reject itself with its own ValidationException.
        return policy_tier if asked is None else None
    if mode == "keep":
        return asked
    if mode == "override":
        return policy_tier or asked
    ceiling = policy_tier or "default"
    return asked if RANK[asked] <= RANK[ceiling] else ceiling


def _offered(tier: str | None, offered: Sequence[str] | None) -> str | None:
    if tier is None or offered is None or tier in offered:
        return tier
    return "default" if "default" in offered else None


class TierTable:
    """The policy's tier decisions, worked out once per (workload, class, pool, asked)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._cache: dict[tuple[str, str, str, str | None], TierChoice] = {}
        # Pools on which the policy names no tier for anyone: there a call whose caller asked
        # for none goes as written (NO_TIER, what _decide gives) without a key or a look-up.
        untiered = all(w.tier is None for w in policy.workloads.values()) and all(
            c.tier is None and c.tier_on_throttle is None for c in policy.priorities.values()
        )
        self.untiered = frozenset(
            name for name, pool in policy.models.items() if untiered and not pool.class_tiers
        )

    def for_call(
        self, operation: str, workload: str, priority: str, pool: str,
        headers: Mapping[str, str], body: bytes,
    ) -> TierChoice | None:  # fmt: skip
        """The tier for one call to ``pool`` (None for operations without tiers)."""
        if operation not in TIERED_OPERATIONS:
            return None
        key = (workload, priority, pool, caller_tier(operation, headers, body))
        hit = self._cache.get(key)  # choose()'s lookup, inline: every call comes here
        return hit if hit is not None else self.choose(*key)

    def choose(self, workload: str, priority: str, pool: str, asked: str | None) -> TierChoice:
        """The tier for one call; ``asked`` is the caller's own (:func:`caller_tier`)."""
        key = (workload, priority, pool, asked)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._decide(*key)
            if len(self._cache) < _CACHE_MAX:
                self._cache[key] = hit
        return hit

    def _decide(self, workload: str, priority: str, pool: str, asked: str | None) -> TierChoice:
        cls = self.policy.priorities[priority]
        pool_cfg = self.policy.models.get(pool)
        offered = pool_cfg.service_tiers if pool_cfg else None
        wanted = self.policy.workloads[workload].tier
        if wanted is None and pool_cfg is not None:
            wanted = pool_cfg.class_tiers.get(priority)
        tier = _offered(_merge(wanted or cls.tier, asked, cls.caller_tier), offered)
        fallback = _offered(cls.tier_on_throttle, offered)
        return TierChoice(tier, fallback if fallback != (tier or "default") else None)


def escalation(choice: TierChoice | None, status: int, error_type: str | None) -> TierChoice | None:
    """The choice to retry with when Bedrock throttled the call on its tier, else None."""
    if (
        choice is None
        or choice.on_throttle is None
        or status != 429
        or error_type != "ThrottlingException"
    ):
        return None
    return TierChoice(choice.on_throttle)


def apply_tier(
    operation: str, body: bytes, headers: Mapping[str, str], choice: TierChoice | None
) -> tuple[bytes, Mapping[str, str]]:
    """The body and headers to send upstream on the chosen tier (unchanged without one)."""
    tier = None if choice is None else choice.tier
    if tier is None:
        return body, headers
    if not operation.startswith("Converse"):
        if headers.get(TIER_HEADER) == tier:
            return body, headers
        out: CIMultiDict[str] = CIMultiDict(headers)
        out[TIER_HEADER] = tier
        return body, out
    doc: dict[str, Any] = orjson.loads(body)
    if doc.get("serviceTier") == {"type": tier}:
        return body, headers
    doc["serviceTier"] = {"type": tier}
    return orjson.dumps(doc), headers
