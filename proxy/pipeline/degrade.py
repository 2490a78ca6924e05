"""Walking a workload's degradation chain when its model pool says no.

The chain is the policy's ``degrade`` list, tried in order: a pool name is a downgrade
(the same request to a cheaper model, admitted against that pool's own quotas), then
``cached`` (an earlier answer to the identical request) and ``template`` (a static
answer in the caller's response shape). Each step is only taken where the policy
allows it for that workload; the caller is always told which one served it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from proxy.admission.estimate import RequestEstimate
from proxy.admission.fit import reserve
from proxy.admission.gate import Gate, Ticket
from proxy.errors import BedrockError
from proxy.metrics import Metrics
from proxy.pipeline.cache import ResponseCache, cache_key, cache_operation
from proxy.pipeline.identify import Caller
from proxy.pipeline.rewrite import downgrade_body_problem, downgrade_path, served_model_headers
from proxy.pipeline.template import TemplateUnsupported, as_stream, render_template
from proxy.policy import CompiledPolicy, PoolInfo
from proxy.routes import Route, base_model_id

log = logging.getLogger("sluice.degrade")

_STREAM_HEADERS = {"Content-Type": "application/vnd.amazon.eventstream"}


@dataclass(slots=True)
class Downgrade:
    """Serve the call from another pool: same request, rewritten model id."""

    pool: PoolInfo
    path: str
    ticket: Ticket
    headers: dict[str, str]


@dataclass(slots=True)
class Fallback:
    """An answer made without calling the upstream (cache or template)."""

    kind: str
    body: bytes
    headers: dict[str, str]


def target_model_id(requested: str, pool_first_id: str) -> str:
    """The target pool's model id, keeping the caller's inference-profile prefix (us., eu.)."""
    if requested.startswith("arn:"):
        return pool_first_id
    base = base_model_id(requested)
    if base != requested and requested.endswith(base):
        return requested[: len(requested) - len(base)] + pool_first_id
    return pool_first_id


@dataclass(frozen=True, slots=True)
class DegradeAsk:
    """A call its pool refused, as the degradation chain needs to see it."""

    policy: CompiledPolicy
    route: Route
    caller: Caller
    pool: PoolInfo
    est: RequestEstimate
    input_tokens: int
    body: bytes
    #: The workload's scheduled concurrency now: it binds on a fallback pool too.
    cap: int | None
    #: The request's headers: the guardrail InvokeModel names is part of the cache key.
    headers: Mapping[str, str] | None = None


class Degrader:
    """Tries a workload's degradation steps after its pool refused."""

    def __init__(
        self,
        gate: Gate,
        cache: ResponseCache,
        metrics: Metrics,
        breaker_allows: Callable[[str], bool],
        held: Callable[[str, str], bool] = lambda pool, priority: False,
    ) -> None:
        """``held(pool, priority)``: Bedrock throttles a higher class on ``pool`` now, so
        a downgrade of ``priority`` must not add to its load (the next step is tried)."""
        self.breaker_allows = breaker_allows
        self.held = held
        self.gate = gate
        self.cache = cache
        self.metrics = metrics

    async def degrade(self, ask: DegradeAsk) -> Downgrade | Fallback | BedrockError | None:
        """The first step of the chain that can serve; None when none can.

        A downgrade whose admission fails for another reason than a 429 (the store is
        down and the class fails closed) returns that error.
        """
        caller = ask.caller
        workload = ask.policy.policy.workloads[caller.workload.name]
        for step in workload.degrade:
            found: Downgrade | Fallback | BedrockError | None
            if step == "cached":
                found = await self._cached(ask, caller)
            elif step == "template":
                found = self._template(ask.policy, ask.route, caller)
            else:
                found = await self._downgrade(step, ask)
            if isinstance(found, BedrockError):
                return found
            if found is not None:
                kind = found.kind if isinstance(found, Fallback) else "downgrade"
                self.metrics.degraded.labels(caller.workload.name, ask.pool.name, kind).inc()
                return found
        return None

    async def _downgrade(self, name: str, ask: DegradeAsk) -> Downgrade | BedrockError | None:
        policy, route, caller = ask.policy, ask.route, ask.caller
        target = policy.pools[name]
        allowed = caller.workload.allowed_pools
        if (allowed is not None and name not in allowed) or self.held(name, caller.priority):
            return None
        if not self.breaker_allows(name):  # after the hold: half-open's True takes a probe
            return None
        assert route.model_id is not None
        model_id = target_model_id(route.model_id, policy.policy.models[name].ids[0])
        problem = downgrade_body_problem(route.operation, ask.body, model_id)
        if problem is not None:
            log.info("downgrade skipped", extra={"fields": {"pool": name, "reason": problem}})
            return None
        # The schedule's cap applies here too: a scheduled workload must not escape it by
        # being refused onto the fallback model.
        plan = policy.plan(caller.workload, target, caller.priority, ask.cap)
        try:
            tokens = reserve(plan, target, ask.input_tokens, ask.est)
        except BedrockError:
            return None  # could never be admitted there: try the next step
        got = await self.gate.admit(caller.workload, caller.priority, target, plan, tokens)
        if isinstance(got, BedrockError):
            return None if got.status == 429 else got
        path = downgrade_path(route.path, route.operation, model_id)
        return Downgrade(target, path, got, served_model_headers(model_id, "downgrade"))

    async def _cached(self, ask: DegradeAsk, caller: Caller) -> Fallback | None:
        policy, route = ask.policy, ask.route
        if policy.policy.workloads[caller.workload.name].cache is None:
            return None
        if cache_operation(route.operation) is None:
            return None
        key = cache_key(
            caller.workload.name, ask.pool.name, route.operation, ask.body, headers=ask.headers
        )
        hit = await self.cache.get(key)
        if hit is None:
            return None
        assert route.model_id is not None
        headers = dict(hit.headers)
        headers.update(served_model_headers(route.model_id, "cache"))
        if not route.streaming:
            return Fallback("cache", hit.body, headers)
        try:
            stream = as_stream(route.operation, hit.body)
        except TemplateUnsupported:
            return None
        headers.update(_STREAM_HEADERS)
        return Fallback("cache", stream, headers)

    def _template(self, policy: CompiledPolicy, route: Route, caller: Caller) -> Fallback | None:
        template = policy.policy.workloads[caller.workload.name].template
        if template is None:
            return None
        assert route.model_id is not None
        try:
            data, headers = render_template(route.operation, template.text, route.model_id)
        except TemplateUnsupported:
            return None
        headers.update(served_model_headers("sluice-template", "template"))
        return Fallback("template", data, headers)
