"""A validated policy compiled for the request path.

Everything the policy fixes is worked out once here — secrets resolved, model ids
mapped to pools, one admission plan per (workload, pool) — so the hot path does
dictionary look-ups, not policy arithmetic.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from proxy.admission import AdmitPlan, Bucket
from proxy.config import Limits, ModelPool, Policy, PolicyError, SecretRef
from proxy.errors import BedrockError
from proxy.routes import base_model_id

#: Pool name for models no pool names (when the policy allows them).
OTHER_POOL = "_other"
#: Bucket capacity when the policy gives none: this many seconds of refill.
DEFAULT_BURST_SECONDS = 10.0
_MODEL_CACHE_MAX = 4096

log = logging.getLogger("proxy.policy")


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """What the request path needs to know about a model pool."""

    name: str
    output_weight: float
    default_max_tokens: int
    #: The model's output ceiling (``models.<pool>.max_output_tokens``); None = undeclared.
    max_output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """What the request path needs to know about a workload."""

    name: str
    priority: str
    share: float
    fail_open: bool
    allowed_pools: frozenset[str] | None


def _requests(limits: Limits | None) -> Bucket | None:
    if limits is None or limits.requests_per_minute is None:
        return None
    rate = limits.requests_per_minute / 60.0
    return Bucket(rate, limits.burst_requests or max(1.0, rate * DEFAULT_BURST_SECONDS))


def _tokens(limits: Limits | None, largest_call: float) -> Bucket | None:
    # The default burst holds at least one call at the pool's default max_tokens, so a
    # single ordinary request can always be admitted into an idle bucket.
    if limits is None or limits.tokens_per_minute is None:
        return None
    rate = limits.tokens_per_minute / 60.0
    return Bucket(rate, limits.burst_tokens or max(largest_call, rate * DEFAULT_BURST_SECONDS))


def _capped(limit: int | None, cap: int | None) -> int | None:
    if cap is None:
        return limit
    return cap if limit is None else min(limit, cap)


def read_secret(ref: SecretRef, where: str, env: Mapping[str, str]) -> str:
    """Resolve a secret reference or raise :class:`PolicyError` naming where it was wanted."""
    if ref.env is not None:
        value = env.get(ref.env)
        if not value:
            raise PolicyError(f"{where}: environment variable {ref.env} is not set")
        return value
    assert ref.file is not None
    try:
        value = Path(ref.file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise PolicyError(f"{where}: cannot read secret file {ref.file}: {exc.strerror}") from None
    if not value:
        raise PolicyError(f"{where}: secret file {ref.file} is empty")
    return value


def token_digest(token: str) -> str:
    """Bearer keys are looked up by digest so the table never holds them in clear."""
    return hashlib.sha256(token.encode()).hexdigest()


def deprecations(policy: Policy) -> list[str]:
    """What the policy sets that Sluice accepts but ignores, one sentence per field."""
    return [
        f"models.{name}.downgrade_to is deprecated and ignored: "
        "use workloads.<name>.degrade (e.g. degrade: [haiku])"
        for name, pool in policy.models.items()
        if pool.downgrade_to is not None
    ]


def warn_deprecated(policy: Policy) -> None:
    """Log each deprecation once per compile: ``policy check``, start-up and every reload."""
    for message in deprecations(policy):
        log.warning(message, extra={"fields": {"event": "policy_deprecated"}})


def _workload_info(policy: Policy, name: str) -> WorkloadInfo:
    wl = policy.workloads[name]
    return WorkloadInfo(
        name=name,
        priority=wl.priority,
        share=policy.priorities[wl.priority].share,
        fail_open=policy.priorities[wl.priority].on_store_failure == "open",
        allowed_pools=frozenset(wl.models) if wl.models is not None else None,
    )


class CompiledPolicy:
    """A policy ready for the request path: look-ups only."""

    def __init__(self, policy: Policy, env: Mapping[str, str] | None = None) -> None:
        warn_deprecated(policy)
        self.policy = policy
        self.header_mode = policy.identity.header_mode
        self.lease_ttl_ms = int(policy.server.lease_ttl_seconds * 1000)
        # Waiters are served highest class first: rank 0 is the largest share, ties in
        # the order the policy lists the classes.
        order = list(policy.priorities)
        by_share = sorted(order, key=lambda n: (-policy.priorities[n].share, order.index(n)))
        self.ranks = {name: i for i, name in enumerate(by_share)}
        self.workloads = {name: _workload_info(policy, name) for name in policy.workloads}
        dw = policy.identity.default_workload
        self.default_workload = self.workloads[dw] if dw is not None else None
        self.secrets: dict[str, tuple[str, WorkloadInfo]] = {}
        self.api_keys: dict[str, WorkloadInfo] = {}
        self._read_keys(os.environ if env is None else env)
        self.pools = {
            name: PoolInfo(name, p.output_token_weight, p.default_max_tokens, p.max_output_tokens)
            for name, p in policy.models.items()
        }
        self._other = PoolInfo(OTHER_POOL, 1.0, 4096)
        #: Workloads with a response cache rule: only their calls are given a cache key.
        self.caching = frozenset(n for n, wl in policy.workloads.items() if wl.cache is not None)
        #: Pools with prices: only their calls are priced into sluice_cost_usd at settlement.
        self.priced = frozenset(name for name, p in policy.models.items() if p.prices)
        self._by_id: dict[str, PoolInfo] = {}
        for name, pool in policy.models.items():
            for model_id in pool.ids:
                self._by_id[model_id] = self.pools[name]
        self._resolved: dict[str, PoolInfo] = {}
        self._plans: dict[tuple[str, str, str, int | None, str | None], AdmitPlan] = {}

    def _read_keys(self, env: Mapping[str, str]) -> None:
        """Resolve every workload's secrets; one :class:`PolicyError` names all missing ones."""
        missing: list[str] = []
        for name, wl in self.policy.workloads.items():
            for i, key in enumerate(wl.access_keys):
                where = f"workloads.{name}.access_keys[{i}].secret"
                try:
                    secret = read_secret(key.secret, where, env)
                except PolicyError as exc:
                    missing.append(str(exc))
                    continue
                self.secrets[key.access_key_id] = (secret, self.workloads[name])
            for i, ref in enumerate(wl.api_keys):
                try:
                    token = read_secret(ref, f"workloads.{name}.api_keys[{i}]", env)
                except PolicyError as exc:
                    missing.append(str(exc))
                    continue
                self.api_keys[token_digest(token)] = self.workloads[name]
        if missing:
            raise PolicyError("\n".join(missing))

    def secret_for(self, access_key_id: str) -> str | None:
        """The secret of a workload's access key, for signature verification."""
        entry = self.secrets.get(access_key_id)
        return entry[0] if entry else None

    def resolve_pool(self, model_id: str) -> PoolInfo:
        """The pool a model id (foundation id, inference profile, ARN) belongs to."""
        hit = self._resolved.get(model_id)
        if hit is not None:
            return hit
        pool = self._by_id.get(model_id) or self._by_id.get(base_model_id(model_id))
        if pool is None:
            if self.policy.server.unknown_models == "refuse":
                raise BedrockError(
                    "ValidationException",
                    f"model '{model_id}' is not in any model pool of this Sluice policy "
                    f"(pools: {', '.join(self.pools) or 'none'})",
                )
            pool = self._other
        if len(self._resolved) < _MODEL_CACHE_MAX:
            self._resolved[model_id] = pool
        return pool

    def plan(
        self,
        workload: WorkloadInfo,
        pool: PoolInfo,
        priority: str,
        cap: int | None = None,
        tier: str | None = None,
    ) -> AdmitPlan:
        """The admission plan for a workload on a pool at a priority (built once, then cached).

        ``cap`` further limits the workload's concurrency (a time-of-day schedule). ``tier``
        is the service tier the call will be sent on: when the pool gives it its own quota
        (``models.<pool>.tiers``), the plan's pool limits are that quota, kept in its own
        scope (:func:`proxy.admission.model.scope_name`).
        """
        quota_tier = None if tier is None else self.quota_tier(pool.name, tier)
        key = (workload.name, pool.name, priority, cap, quota_tier)
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        plan = self._build_plan(workload, pool, priority, cap, quota_tier)
        self._plans[key] = plan
        return plan

    def quota_tier(self, pool: str, tier: str | None) -> str | None:
        """``tier`` when the pool gives it its own quota, else None (the pool's quota)."""
        pool_cfg = self.policy.models.get(pool)
        return (
            tier if tier is not None and pool_cfg is not None and tier in pool_cfg.tiers else None
        )

    def _build_plan(
        self,
        workload: WorkloadInfo,
        pool: PoolInfo,
        priority: str,
        cap: int | None,
        tier: str | None,
    ) -> AdmitPlan:
        pool_cfg: ModelPool | None = self.policy.models.get(pool.name)
        quota: Limits | None = pool_cfg
        if pool_cfg is not None and tier is not None:
            quota = cast("dict[str, Limits]", pool_cfg.tiers)[tier]
        wl_limits = self.policy.workloads[workload.name].limits
        wl_cfg: Limits | None = wl_limits.get(pool.name, wl_limits.get("*"))
        # A default burst holds one call at the model's real ceiling when the pool declares it.
        max_call = max(pool.default_max_tokens, pool.max_output_tokens or 0) * pool.output_weight
        return AdmitPlan(
            pool=pool.name,
            workload=workload.name,
            priority=priority,
            share=self.policy.priorities[priority].share,
            pool_requests=_requests(quota),
            pool_tokens=_tokens(quota, max_call),
            pool_concurrency=quota.concurrency if quota else None,
            workload_requests=_requests(wl_cfg),
            workload_tokens=_tokens(wl_cfg, max_call),
            workload_concurrency=_capped(wl_cfg.concurrency if wl_cfg else None, cap),
            lease_ttl_ms=self.lease_ttl_ms,
            rank=self.ranks[priority],
            tier=tier,
            hold_ahead=pool_cfg is None or pool_cfg.adaptive is None,
        )

    def unmetered(self, plan: AdmitPlan) -> bool:
        """True when no limit applies, so admission can skip the store entirely."""
        return plan.unmetered


class PolicyRef:
    """The policy in force; a hot reload swaps it, each request reads ``current`` once."""

    __slots__ = ("current",)

    def __init__(self, current: CompiledPolicy) -> None:
        self.current = current

    def swap(self, new: CompiledPolicy) -> None:
        """Make ``new`` the policy of every request that starts from now on."""
        self.current = new
